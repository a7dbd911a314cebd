"""Every option of every config group composes and runs a tiny training; loggers write their files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from rewardlab.backbones import tiny
from rewardlab.data import DataError
from rewardlab.train import train

from .conftest import CONF, FIXTURES

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(group, p.stem) for group in GROUPS for p in sorted((CONF / group).glob("*.yaml"))]
QUIZ = CONF.parent / "rewardlab" / "assets" / "quiz"


@pytest.fixture(scope="module")
def local_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model saved as a normal Hugging Face folder, standing in for a hub name."""
    folder = tmp_path_factory.mktemp("local-model")
    torch.manual_seed(0)
    bb = tiny("llama", 32, 2, 4, 64, 256, 0.0)
    bb.model.save_pretrained(folder)
    bb.tokenizer.save_pretrained(folder)
    return folder


def needs(group: str, option: str, local_model: Path) -> list[str]:
    """What an option needs besides itself to run offline on this machine."""
    if (group, option) == ("backbone", "hf"):
        return [f"backbone.name_or_path={local_model}"]
    if (group, option) == ("data", "default"):
        return [f"data.train_file={QUIZ}/train.jsonl", f"data.val_file={QUIZ}/val.jsonl"]
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
        "optimizer",
        "scheduler",
        "trainer",
        "logger",
        "callbacks",
        "paths",
        "experiment",
        "debug",
    } <= set(GROUPS)
    assert (CONF / "hydra" / "default.yaml").exists()


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_trains(group, option, make_cfg, local_model):
    cfg = make_cfg(f"{group}={option}", *needs(group, option, local_model))
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
    cfg = make_cfg("logger=wandb", f"data.train_file={bad}")
    with pytest.raises(DataError, match="field 'rejected': missing"):
        train(cfg)
    assert wandb_exit_code(Path(cfg.paths.output_dir)) == 1


def test_csv_and_tensorboard_loggers_write_their_files(make_cfg):
    cfg = make_cfg("logger=csv")
    train(cfg)
    metrics = (Path(cfg.paths.output_dir) / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/loss_step" in metrics and "val/acc" in metrics
    cfg = make_cfg("logger=tensorboard")
    train(cfg)
    assert list(Path(cfg.paths.output_dir).glob("tensorboard/version_0/events.out.tfevents.*"))


def test_results_hold_parameter_counts(make_cfg):
    cfg = make_cfg()
    results = json.loads(json.dumps(train(cfg)))
    model = instantiate(cfg.backbone).model
    assert results["params/total"] == sum(p.numel() for p in model.parameters()) + model.config.hidden_size
