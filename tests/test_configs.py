"""Every option of every config group composes and runs a tiny training; loggers write their files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from rewardlab.backbones import tiny
from rewardlab.data.rows import DataError
from rewardlab.train import train

from .conftest import CONF, FIXTURES

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(group, p.stem) for group in GROUPS for p in sorted((CONF / group).glob("*.yaml"))]
QUIZ = CONF.parent / "assets" / "quiz"
GPU_TRAINERS = ["gpu", "ddp", "fsdp", "deepspeed"]
# need GPUs, run in a subprocess (ddp_cpu) or under SLURM (slurm, in test_reliability)
ELSEWHERE = {("trainer", t) for t in [*GPU_TRAINERS, "ddp_cpu", "slurm"]}
RUNNABLE = [
    pytest.param(g, o, id=f"{g}={o}", marks=[pytest.mark.slow] if o == "smollm2_135m" else [])
    for g, o in OPTIONS
    if (g, o) not in ELSEWHERE
]


@pytest.fixture(scope="module")
def margin_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Quiz pairs with a margin column, for loss=margin."""
    folder = tmp_path_factory.mktemp("margins")
    for split in ("train", "val"):
        rows = [json.loads(line) | {"margin": 0.5} for line in (QUIZ / f"{split}.jsonl").read_text().splitlines()]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:300]))
    return folder


@pytest.fixture(scope="module")
def local_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model saved as a normal Hugging Face folder, standing in for a hub name."""
    folder = tmp_path_factory.mktemp("local-model")
    torch.manual_seed(0)
    bb = tiny("llama", 32, 2, 4, 64, 512, 0.0)  # positions for the presets' max_length
    bb.model.save_pretrained(folder)
    bb.tokenizer.save_pretrained(folder)
    return folder


def needs(group: str, option: str, local_model: Path, margin_data: Path) -> list[str]:
    """What an option needs besides itself to run offline on this machine."""
    if (group, option) == ("loss", "margin"):
        return [
            f"data.train_file={margin_data}/train.jsonl",
            f"data.val_file={margin_data}/val.jsonl",
            "data.test_file=null",
        ]
    if (group, option) == ("freeze", "bitfit"):
        return ["backbone.family=gpt2"]  # Llama-like backbones have no biases
    if (group, option) == ("backbone", "smollm2_135m"):  # 135M parameters on 2 CPU cores: keep it small, and
        return [  # skip the speed probes (minutes for this model here; tested on small ones in test_speed.py)
            "data.batch_size=2",
            "data.eval_batch_size=4",
            "trainer.limit_train_batches=2",
            "trainer.precision=bf16-mixed",
            "backbone.attn_implementation=sdpa",
            "callbacks.model_checkpoint.save_weights_only=true",  # one 0.5 GB checkpoint, not two of 1.6 GB
            "callbacks.model_checkpoint.save_last=false",
            "~callbacks.last_checkpoint",
        ]
    if (group, option) == ("experiment", "backbone_compare"):
        return ["trainer.val_check_interval=1.0"]
    if (group, option) == ("backbone", "hf"):
        return [f"backbone.name_or_path={local_model}"]
    if (group, option) in (("data", "default"), ("experiment", "length_heads")):  # the latter: your data
        return [f"data.train_file={QUIZ}/train.jsonl", f"data.val_file={QUIZ}/val.jsonl"]
    ratings = [f"data.{s}_file={FIXTURES}/ratings.jsonl" for s in ("train", "val", "test")]
    ratings += ["data.attributes=[helpful,concise]", "data.attribute_weights=[1.0,0.5]"]
    if group == "method" or (group, option) == ("experiment", "ratings_compare"):  # the methods for ratings
        return ratings
    if (group, option) in (("loss", "regression"), ("head", "attributes")):
        return [*ratings, "head=attributes", "loss=regression"]
    if (group, option) == ("loss", "bt_ties"):
        return [f"data.{s}_file={FIXTURES}/ties.jsonl" for s in ("train", "val", "test")] + ["data.ties=keep"]
    if (group, option) == ("experiment", "hh_rlhf"):  # the hub names, swapped for local stand-ins
        return [
            f"backbone.name_or_path={local_model}",
            f"data.train_file={FIXTURES}/implicit.jsonl",
            f"data.val_file={FIXTURES}/implicit.jsonl",
            "trainer.precision=32-true",
            "trainer.val_check_interval=1.0",
        ]
    return []


def test_every_group_has_options():
    assert {
        "data",
        "backbone",
        "loss",
        "freeze",
        "head",
        "optimizer",
        "scheduler",
        "trainer",
        "logger",
        "callbacks",
        "paths",
        "experiment",
        "method",
        "debug",
    } <= set(GROUPS)
    assert (CONF / "hydra" / "default.yaml").exists()


@pytest.mark.parametrize("group, option", RUNNABLE)
def test_option_composes_and_trains(group, option, make_cfg, local_model, margin_data):
    cfg = make_cfg(f"{group}={option}", *needs(group, option, local_model, margin_data))
    if group == "logger":  # make_cfg turns the logger off unless the option under test is a logger
        cfg = make_cfg(f"logger={option}")
    results = train(cfg)
    assert results["global_step"] >= 1
    assert (Path(cfg.paths.output_dir) / "results.json").exists()


def test_experiment_hh_rlhf_sets_the_hub_names():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=hh_rlhf"])
    assert cfg.backbone._target_ == "rewardlab.backbones.pretrained"
    assert cfg.backbone.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (cfg.data.train_file, cfg.data.schema) == ("Anthropic/hh-rlhf:train", "implicit")


def wandb_exit_code(run_dir: Path) -> int:
    (log,) = run_dir.glob("wandb/offline-run-*/logs/debug.log")
    return int(log.read_text().rsplit("got exitcode: ", 1)[1].split()[0])


def test_wandb_runs_offline_without_an_account_and_finishes(make_cfg):
    cfg = make_cfg("logger=wandb", "logger.wandb.group=g1", "logger.wandb.tags=[a,b]")
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert len(list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))) == 1
    assert wandb_exit_code(run_dir) == 0


def test_wandb_run_of_a_failed_job_is_finished_with_exit_code_1(make_cfg, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "x"}\n')
    cfg = make_cfg("logger=wandb", f"data.train_file={bad}", "data.val_file=null", "data.test_file=null")
    with pytest.raises(DataError, match="field 'rejected': missing"):
        train(cfg)
    assert wandb_exit_code(Path(cfg.paths.output_dir)) == 1


def test_csv_and_tensorboard_loggers_write_their_files(make_cfg):
    cfg = make_cfg("logger=csv")
    train(cfg)
    metrics = (Path(cfg.paths.output_dir) / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/loss_step" in metrics and "val/acc" in metrics
    cfg = make_cfg("logger=tensorboard", folder="tensorboard")
    train(cfg)
    assert list(Path(cfg.paths.output_dir).glob("tensorboard/version_0/events.out.tfevents.*"))


def test_results_hold_parameter_counts(make_cfg):
    cfg = make_cfg()
    results = json.loads(json.dumps(train(cfg)))
    model = instantiate(cfg.backbone).model
    assert results["params/total"] == sum(p.numel() for p in model.parameters()) + model.config.hidden_size


@pytest.mark.parametrize("option", GPU_TRAINERS)
def test_gpu_trainers_compose_and_build_their_strategy(option, make_cfg):
    cfg = make_cfg(f"trainer={option}")
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    strategy = cfg.trainer.get("strategy")
    if isinstance(strategy, str):
        assert strategy == ("ddp" if option == "ddp" else "auto")
    elif option == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        assert strategy.stage == 2  # composed and typed; building it needs `pip install deepspeed`
    else:
        assert type(instantiate(strategy)).__name__ == strategy._target_.rsplit(".", 1)[1]
    if torch.cuda.is_available():
        assert train(cfg)["global_step"] >= 1


def test_loss_margin_refuses_data_without_margins_before_training(make_cfg):
    with pytest.raises(
        DataError, match=r"the loss \(MarginBradleyTerry\) needs a margin for every pair, but 6000 of 6000"
    ):
        train(make_cfg("loss=margin"))


@pytest.mark.parametrize(
    "launcher, target",
    [
        ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
        ("submitit_slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
        ("submitit_local", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"),
    ],
)
def test_launchers_compose_with_the_train_config(launcher, target):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == target
    if launcher == "submitit_slurm":
        assert cfg.hydra.launcher.max_num_timeout >= 0 and cfg.hydra.launcher.timeout_min > 0


def test_optuna_search_composes_and_maximises_val_acc_best():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=optuna"], return_hydra_config=True)
    assert cfg.optimized_metric == "val/acc_best" and cfg.hydra.sweeper.direction == "maximize"
    assert "recipe.lr_scale" in cfg.hydra.sweeper.params and str(cfg.hydra.mode) == "RunMode.MULTIRUN"


@pytest.mark.parametrize(
    "overrides, lr",
    [
        ([], 2e-3),  # the tiny model from scratch
        (["backbone=minilm"], 2e-5),  # a pretrained encoder: two orders of magnitude lower
        (["backbone=smollm2_135m"], 1e-5),
        (["backbone=hf"], 1e-5),
        (["backbone=minilm", "optimizer=sgd"], 25 * 2e-5),  # each optimizer scales the recipe's AdamW rate
        (["backbone=minilm", "optimizer=lion"], 0.15 * 2e-5),
        (["backbone=minilm", "optimizer.lr=1e-4"], 1e-4),  # the command line wins
        (["backbone=minilm", "experiment=freeze_ablation"], 1e-4),  # and so does a preset
        (["backbone=minilm", "recipe.lr_scale=4"], 8e-5),  # experiment=lr_sweep and optuna scale the recipe
        (["backbone=tiny", "optimizer=sgd", "recipe.lr_scale=0.5"], 25 * 2e-3 / 2),
    ],
)
def test_each_backbone_brings_its_learning_rate(overrides, lr):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    assert cfg.optimizer.lr == pytest.approx(lr, rel=1e-9)


def test_a_learning_rate_scale_that_would_scale_nothing_is_refused(make_cfg):
    from rewardlab.checks import ConfigError
    from rewardlab.run import build

    with pytest.raises(ConfigError, match=r"recipe.lr_scale=4 scales the backbone's recipe rate, but optimizer.lr is "):
        build(make_cfg("recipe.lr_scale=4", "optimizer.lr=1e-4"))


def test_the_recipe_sets_head_rate_and_warmup_unless_set_directly():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["backbone=minilm", "recipe.head_lr_mult=3", "recipe.warmup=0.1"])
        assert cfg.model.head_lr_mult == 3 and cfg.scheduler.warmup == 0.1
        cfg = compose("train", overrides=["recipe.head_lr_mult=3", "model.head_lr_mult=2", "scheduler.warmup=7"])
        assert cfg.model.head_lr_mult == 2 and cfg.scheduler.warmup == 7
        for backbone in ("tiny", "minilm", "smollm2_135m", "hf"):  # every packaged recipe is complete
            recipe = compose("train", overrides=[f"backbone={backbone}"]).recipe
            assert set(recipe) == {"lr", "lr_scale", "head_lr_mult", "warmup"} and recipe.lr_scale == 1.0


@pytest.mark.parametrize(
    "override, says",
    [
        ("recipe.lr=abc", "error: optimizer.lr: recipe.lr: the optimizer's rate is the backbone's recipe rate times 1; "
         "expected a finite number > 0, got 'abc'"),
        ("~recipe", "got None (a backbone option of your own: a `# @package _global_` file with `backbone:` and a "
         "top-level `recipe: {lr: ...}`"),
        ("recipe.lr=-1e-3", "error: optimizer.lr: recipe.lr: "),
        ("recipe.lr_scale=0", "error: optimizer.lr: recipe.lr_scale: expected a finite number > 0"),
        ("recipe.lr=${oc.env:RL_TEST_SECRET_KEY}", "got '***'"),
        ("optimizer.lr=${nope}", "error: optimizer.lr: Interpolation key 'nope' not found"),
    ],
)  # fmt: skip
def test_a_learning_rate_that_does_not_resolve_is_one_line_naming_the_key(override, says, tmp_path):
    from .test_train import run_cli

    secret = {"RL_TEST_SECRET_KEY": "hunter2-not-for-logs"}
    done = run_cli(override, "logger=none", f"hydra.run.dir={tmp_path / 'run'}", env=secret, timeout=120)
    assert "hunter2" not in done.stderr
    assert done.returncode == 1 and says in done.stderr.splitlines()[-1]
    assert "Traceback" not in done.stderr
