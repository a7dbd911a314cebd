"""Richer preference data end to end: every new loss, head and method trains; a prompt's K responses run in
one pass (sharing the prompt where the backbone can); ties are counted apart; attribute heads learn, export
as one logit and come back with their ratings in `score` and `serve`; what cannot work is refused."""

from __future__ import annotations

import json
import math
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from rewardlab.backbones import tiny
from rewardlab.checks import ConfigError
from rewardlab.data.batching import pad_sequences
from rewardlab.data.rows import DataError
from rewardlab.eval import evaluate
from rewardlab.export import export
from rewardlab.heads import AttributesHead, EnsembleHead, OdinHead
from rewardlab.losses import BradleyTerry, PlackettLuce, Regression
from rewardlab.metrics import PairMetrics
from rewardlab.report import report
from rewardlab.run import load_run
from rewardlab.score import score_file
from rewardlab.scoring import HEADS_FILE, Scorer, UntrustedExport
from rewardlab.serve import serving
from rewardlab.shared_prompt import pack
from rewardlab.train import train

from .conftest import CONF, FIXTURES, compose_config, reward_model
from .test_serve import SERVER, post

RATINGS = [f"data.{s}_file={FIXTURES}/ratings.jsonl" for s in ("train", "val", "test")]
ATTRIBUTES = ["data.attributes=[helpful,concise]", "data.attribute_weights=[1.0,0.5]"]
RANKINGS = [f"data.{s}_file={FIXTURES}/rankings.jsonl" for s in ("train", "val", "test")]
TIES = [f"data.{s}_file={FIXTURES}/ties.jsonl" for s in ("train", "val", "test")]


@pytest.mark.parametrize(
    "overrides",
    [
        ["method=bt_pairs", *RATINGS, *ATTRIBUTES],
        ["method=plackett_luce", *RATINGS, *ATTRIBUTES],
        ["method=regression", *RATINGS, *ATTRIBUTES, "loss.kind=gaussian_nll"],
        ["method=regression", *RATINGS[:2], f"data.test_file={FIXTURES}/ties.jsonl", *ATTRIBUTES],  # any pairs
        ["loss=plackett_luce", *RANKINGS],
        ["loss=plackett_luce", "head=linear"],  # the quiz's pairs as rankings of two
        ["loss=bt_ties", "data.ties=keep", *TIES],
        ["loss=bt_ties", "data.ties=keep", "head=ensemble", *TIES],
        ["loss=bt_ties", "data.ties=keep", "head=odin", *TIES],
    ],
    ids=[
        "bt_pairs",
        "plackett_luce",
        "regression_nll",
        "regression_pair_test",
        "rankings",
        "quiz_as_lists",
        "ties",
        "ties_ensemble",
        "ties_odin",
    ],
)
def test_every_new_loss_head_and_method_trains_and_tests_on_pairs(overrides, make_cfg):
    results = train(make_cfg(*overrides, "trainer.limit_train_batches=3"))
    assert results["global_step"] >= 1 and math.isfinite(results["val/loss"]) and 0 <= results["test/acc"] <= 1
    if "data.ties=keep" in overrides:
        assert results["test/tie_pairs"] == 2 and results["data/train/ties"] == 2
    if "method=regression" in overrides and RATINGS[2] in overrides:  # each attribute's error, in ratings' units
        assert {"test/rmse_helpful", "test/spearman_concise"} <= set(results) and results["test/rmse_helpful"] > 0


def test_the_ratings_experiment_composes_each_method(tmp_path, cache_dir):
    experiment = OmegaConf.load(CONF / "experiment" / "ratings_compare.yaml")
    assert experiment.hydra.sweeper.params == {"method": "bt_pairs,plackett_luce,regression", "seed": "1,2,3"}
    for method, (loss, head, pairs_from) in {
        "bt_pairs": ("BradleyTerry", "LinearHead", "ratings"),
        "plackett_luce": ("PlackettLuce", "LinearHead", None),
        "regression": ("Regression", "AttributesHead", None),
    }.items():
        cfg = compose_config("train", ["experiment=ratings_compare", f"method={method}"], tmp_path, cache_dir)
        assert (cfg.loss._target_.rsplit(".")[-1], cfg.head._target_.rsplit(".")[-1]) == (loss, head)
        assert cfg.data.pairs_from == pairs_from and cfg.backbone._target_ == "rewardlab.backbones.minilm"


@pytest.mark.parametrize(
    "overrides, error, says",
    [
        (["loss=bradley_terry", "data.ties=keep", *TIES], DataError, "2 training pairs are ties .* use loss=bt_ties"),
        (["loss=regression", *RATINGS, *ATTRIBUTES], ConfigError, "use head=attributes, not head=linear"),
        (["head=attributes", *RATINGS, *ATTRIBUTES], ConfigError, "head=attributes is fitted to ratings"),
        (["loss=plackett_luce", "head=ensemble"], ConfigError, "head=ensemble weighs each pair per head"),
        (["loss=plackett_luce", "head=odin"], ConfigError, "head=odin .* needs a pairwise loss"),
        (["method=regression", *RANKINGS], DataError, "loss=regression fits ratings, but .* holds rankings"),
        (["method=plackett_luce", "data.pairs_from=ratings", *RATINGS, *ATTRIBUTES], DataError, "unset it"),
        (["data.pairs_from=ratings"], DataError, "data.pairs_from=ratings: .* holds pairs; unset it"),
        (["loss=bt_ties", "loss.log_tie_init=1e30"], ConfigError, "loss.log_tie_init: expected a number in"),
        (["loss=regression", "head=attributes", "loss.kind=mae", *RATINGS, *ATTRIBUTES], ConfigError, "loss.kind"),
        (["loss=bt_ties", "loss.lr=1e300"], ConfigError, "loss.lr: expected a number in \\(0, 1\\]"),
        (["loss=bt_ties", "optimizer=adafactor"], ConfigError, "optimizer=adafactor would barely move"),
    ],
)
def test_combinations_that_cannot_work_are_refused_before_training(overrides, error, says, make_cfg):
    with pytest.raises(error, match=says):
        train(make_cfg(*overrides))


def test_k_responses_run_in_one_pass_sharing_their_prompt_with_the_rewards_of_separate_passes():
    torch.manual_seed(0)
    model = reward_model(tiny("llama", 32, 2, 2, 64, 128, 0.0, attn_implementation="eager").model)
    prompt, other = list(range(10, 40)), list(range(50, 60))
    seqs = [prompt + [3, 4], prompt + [5, 6, 7], prompt + [8], other + [9, 9], other + [11]]
    ids, mask = pad_sequences(seqs, pad_id=0)
    packed = pack(ids, mask, [[0, 1, 2], [3, 4]])
    assert packed.input_ids.shape == (2, 30 + 2 + 3 + 1) and packed.real_tokens == 36 + 13
    with torch.no_grad():
        separate = torch.stack([model(*pad_sequences([s], 0)) for s in seqs]).flatten()
        model.sharing = True
        batch = {"input_ids": ids, "attention_mask": mask, "group": torch.tensor([0, 0, 0, 1, 1])}
        shared = model.head.reward(model.batch_outputs(batch))
    torch.testing.assert_close(shared, separate, rtol=1e-4, atol=1e-5)
    assert batch["padded_tokens"] == 2 * 36 < ids.numel()  # one row per prompt, not one per response


def test_pair_metrics_leave_ties_out_of_accuracy_and_report_them_apart():
    metrics = PairMetrics()
    chosen, rejected = torch.tensor([1.0, 0.0, 2.0, 0.5]), torch.tensor([0.0, 1.0, 2.5, 0.0])
    tie = torch.tensor([False, False, True, True])
    metrics.update(chosen, rejected, torch.tensor(0.8), torch.tensor([5, 5, 5, 5, 1, 1, 1, 1]), None, tie)
    out = metrics.compute()
    assert out["acc"] == 0.5 and out["tie_pairs"] == 2 and math.isclose(out["tie_abs_margin"].item(), (0.5 + 0.5) / 2)
    assert math.isclose(out["loss"].item(), 0.8, rel_tol=1e-6) and math.isclose(out["margin"].item(), 0.0)


def test_an_attributes_head_combines_centred_ratings_into_one_linear_reward():
    head = AttributesHead(3, None, ["a", "b"], [1.0, -2.0], normalize=True)
    head.fit_targets(torch.tensor([[1.0, 10.0], [3.0, 10.0], [5.0, 10.0]]))
    assert head.mean.tolist() == [3.0, 10.0] and torch.allclose(head.std, torch.tensor([math.sqrt(8 / 3), 1.0]))
    pooled = torch.randn(4, 3)
    outputs = head(pooled)
    ratings = head.attributes(outputs)
    torch.testing.assert_close(head.reward(outputs), (ratings - head.mean) @ torch.tensor([1.0, -2.0]))
    torch.testing.assert_close(head.reward(outputs), (pooled @ head.reward_weight().T)[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.normalised(torch.tensor([[3.0, 11.0]])), torch.tensor([[0.0, 1.0]]))


def test_regression_on_attribute_heads_recovers_each_attribute_from_features():
    torch.manual_seed(0)
    features, truth = torch.randn(400, 8), torch.randn(8, 2)
    ratings = features @ truth * torch.tensor([2.0, 0.5]) + torch.tensor([5.0, 1.0])
    head = AttributesHead(8, None, ["x", "y"], [1.0, 1.0], normalize=True)
    head.fit_targets(ratings[:300])
    loss, optimizer = Regression("gaussian_nll"), torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        loss(head(features[:300]), head.normalised(ratings[:300]), head.log_var).backward()
        optimizer.step()
    held_out = head.attributes(head(features[300:])).detach()
    rmse = (held_out - ratings[300:]).square().mean(0).sqrt()
    assert (rmse < 0.1 * ratings.std(0)).all()  # R² above 0.99 on held-out responses
    assert (head.log_var < -2).all()  # a near-exact fit learns a small variance


def test_a_listwise_loss_and_a_pointwise_one_measure_pairs_with_bradley_terry():
    model = reward_model(tiny("llama", 32, 1, 2, 64, 128, 0.0).model, loss=PlackettLuce())
    assert isinstance(model.pair_loss_fn, BradleyTerry)
    head = partial(AttributesHead, names=["a"], weights=[1.0], normalize=False)
    model = reward_model(tiny("llama", 32, 1, 2, 64, 128, 0.0).model, loss=Regression("mse"), head=head)
    assert isinstance(model.pair_loss_fn, BradleyTerry) and not isinstance(model.head, (EnsembleHead, OdinHead))


@pytest.fixture(scope="module")
def regression_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A tiny decoder fitted to the ratings fixture (2 attributes) for 20 steps, and its export."""
    run = tmp_path_factory.mktemp("run-attributes")
    overrides = ["logger=none", "trainer.max_steps=20", "~callbacks.progress_bar", "method=regression"]
    train(compose_config("train", [*overrides, *RATINGS, *ATTRIBUTES], run, cache_dir))
    export(compose_config("export", [f"ckpt_path={run}/checkpoints/last.ckpt", f"output_dir={run}/rm"],
                          run / "x", cache_dir))  # fmt: skip
    return run


def test_an_attributes_export_is_one_logit_and_scoring_gives_the_models_ratings(regression_run):
    info = json.loads((regression_run / "rm" / "config.json").read_text())["rewardlab"]
    _, model, _ = load_run(str(regression_run / "checkpoints" / "last.ckpt"))
    assert info["head"]["kind"] == "attributes" and info["head"]["names"] == ["helpful", "concise"]
    assert info["head"]["combination"] == [1.0, 0.5] and info["head"]["std"] == model.head.std.tolist()
    scorer = Scorer(str(regression_run / "rm"), False, 4)
    seqs = [scorer.encode("What is the capital of France?", r)[1] for r in ("Paris.", "Lyon.", "Nice, I think.")]
    with torch.no_grad():
        outputs = model.outputs(*pad_sequences(seqs, 0))
    both = scorer.score(seqs, with_attributes=True)
    assert both.shape == (3, 3) and not scorer.has_std and scorer.attributes == ["helpful", "concise"]
    assert np.allclose(both[:, 0], model.head.reward(outputs).numpy(), atol=1e-4)
    assert np.allclose(both[:, 1:], model.head.attributes(outputs).numpy(), atol=1e-4)
    assert np.allclose(scorer.score(seqs), both[:, 0])


@pytest.mark.parametrize(
    "change, says",
    [
        ({"names": ["helpful"]}, "rewardlab.head.names"),
        ({"names": ["a", "a"]}, "rewardlab.head.names"),
        ({"std": [1.0, 0.0]}, "rewardlab.head.std .* numbers > 0"),
        ({"mean": [1.0, float("nan")]}, "rewardlab.head.mean"),
        ({"combination": [1.0, "0.5"]}, "rewardlab.head.combination"),
        ({"mean": [10**400, 0.0]}, "rewardlab.head.mean .* within ±1e30"),
        ({"combination": [1.0, 0.6]}, "the combination of its attributes is not the model's reward head"),
        ({"mean": [0.0, 0.0], "std": [2.0, 1.0]}, "the combination of its attributes is not the model's reward head"),
        ({"names": ["concise", "helpful"]}, "differs from the entry rewardlab_heads.safetensors"),
        ({"names": ["helpful", "brief"]}, "rewardlab.head differs from the entry"),
        ({"mean": "shifted"}, "rewardlab.head differs from the entry"),  # each mean + 1: the reward is unchanged
    ],
)
def test_an_attributes_entry_that_does_not_match_the_model_is_refused(change, says, regression_run, tmp_path):
    folder = tmp_path / "rm"
    shutil.copytree(regression_run / "rm", folder)
    config = json.loads((folder / "config.json").read_text())
    head = config["rewardlab"]["head"]
    head |= {"mean": [m + 1.0 for m in head["mean"]]} if change == {"mean": "shifted"} else change
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UntrustedExport, match=says):
        Scorer(str(folder), False, 4)
    assert (folder / HEADS_FILE).exists()


def test_score_and_serve_give_each_responses_ratings_and_score_takes_a_prompts_k_responses(
    regression_run, tmp_path, cache_dir
):
    rows = [
        {"prompt": "What is the capital of France?", "responses": ["Paris.", "Lyon.", "Nice."], "ranks": [1, 2, 3]},
        {"prompt": "Say hello.", "chosen": "Hola.", "rejected": "Bonjour."},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_config("score", [f"model_dir={regression_run / 'rm'}", f"input={tmp_path / 'in.jsonl'}",
                                   f"output={tmp_path / 'out.jsonl'}"], tmp_path / "s", cache_dir)  # fmt: skip
    score_file(cfg)
    ranking, pair = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    scorer = Scorer(str(regression_run / "rm"), False, 4)
    expected = scorer.score(
        [scorer.encode(rows[0]["prompt"], r)[1] for r in rows[0]["responses"]], with_attributes=True
    )
    assert np.allclose(ranking["reward"], expected[:, 0], atol=1e-5) and len(ranking["attributes"]) == 3
    assert np.allclose([a["concise"] for a in ranking["attributes"]], expected[:, 2], atol=1e-5)
    assert set(pair["attributes"]) == {"chosen", "rejected"} and set(pair["attributes"]["chosen"]) == {
        "helpful",
        "concise",
    }
    serve_cfg = compose_config("serve", [f"model_dir={regression_run / 'rm'}", "port=0", *SERVER], tmp_path / "v",
                               cache_dir)  # fmt: skip
    texts = ["[BOS]Say hello.[SEP]Hola.[EOS]", "[BOS]Say hello.[SEP]Bonjour.[EOS]"]
    with serving(serve_cfg) as url:
        status, answer = post(url, {"query": texts})
    assert status == 200 and set(answer) == {"rewards", "attributes"}
    want = scorer.score([scorer.encode_text(t)[1] for t in texts], with_attributes=True)
    assert np.allclose(answer["rewards"], want[:, 0], atol=1e-4)
    assert np.allclose([a["helpful"] for a in answer["attributes"]], want[:, 1], atol=1e-4)


def test_eval_leaves_ties_out_of_accuracy_and_reports_them_apart(make_cfg, tmp_path, cache_dir):
    cfg = make_cfg("loss=bt_ties", "data.ties=keep", *TIES, "trainer.max_steps=4")
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    result = evaluate(compose_config("eval", [f"ckpt_path={ckpt}", "logger=none"], tmp_path / "e", cache_dir), [])
    assert result["pairs"] == 2 and result["tie_pairs"] == 2 and result["tie_abs_margin"] >= 0
    rows = [json.loads(line) for line in (tmp_path / "e" / "rewards.jsonl").read_text().splitlines()]
    assert [r["tie"] for r in sorted(rows, key=lambda r: r["row"])] == [False, True, False, True]


def test_the_report_pairs_runs_on_the_pairs_made_of_ratings_whatever_each_trained_on(make_cfg, tmp_path):
    sweep = tmp_path / "sweep"
    for i, (method, seed) in enumerate([(m, s) for m in ("bt_pairs", "plackett_luce") for s in (1, 2)]):
        overrides = [f"method={method}", f"seed={seed}"]
        cfg = make_cfg(*overrides, *RATINGS, *ATTRIBUTES, "trainer.max_steps=3", folder=f"sweep/{i}")
        train(cfg)
        (sweep / str(i) / ".hydra").mkdir(exist_ok=True)
        (sweep / str(i) / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    pairs = (sweep / "0" / "test_pairs.csv").read_text().splitlines()
    assert pairs[0] == "pair,correct,margin" and {p.split(",")[0] for p in pairs[1:]} == {"1>3", "1>4", "4>3", "2>5"}
    text = report(sweep)
    row = next(line for line in text.splitlines() if line.startswith("| plackett_luce |"))
    assert row.split(" | ")[6] == "4" and "no paired test" not in text  # paired over the 4 test pairs


def test_held_out_pairs_whose_responses_are_training_responses_are_counted_for_group_training(make_cfg, caplog):
    caplog.set_level("WARNING")
    train(make_cfg("method=plackett_luce", *RATINGS, *ATTRIBUTES, "trainer.max_steps=1"))
    assert "data val: 4 of its 4 pairs are also in the training data" in caplog.text


def test_the_tie_parameter_trains_at_the_losss_own_rate_not_the_backbones(make_cfg):
    cfg = make_cfg("loss=bt_ties", "data.ties=keep", *TIES, "loss.lr=0.1", "trainer.max_epochs=6", "test=false")
    train(cfg)
    checkpoint = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    groups = {g["name"]: g for g in checkpoint["optimizer_states"][0]["param_groups"]}
    assert groups["loss"]["initial_lr"] == 0.1 and groups["loss"]["weight_decay"] == 0.0
    assert groups["backbone"]["initial_lr"] == cfg.optimizer.lr == 2e-3
    moved = checkpoint["state_dict"]["loss_fn.log_tie"].item()
    # Adam moves a parameter about its rate per step: 6 steps at the backbone's 2e-3 could not pass 0.012.
    # Up, as half the pairs are ties (at equal rewards the likelihood peaks at ν = 2, log ν = 0.69).
    assert checkpoint["global_step"] == 6 and 0.2 < moved < 0.6


def test_a_bt_ties_checkpoint_from_before_the_loss_group_loads_and_refuses_to_resume_in_one_line(
    make_cfg, tmp_path, caplog
):
    cfg = make_cfg("loss=bt_ties", "data.ties=keep", *TIES, "trainer.max_steps=2", "trainer.max_epochs=2", "test=false")
    train(cfg)
    old = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    del old["rewardlab_config"]["loss"]["lr"]  # as stored before log ν had its own rate and group
    state = old["optimizer_states"][0]
    *groups, loss = state["param_groups"]
    groups[1]["params"] = sorted(groups[1]["params"] + loss["params"])
    state["param_groups"] = groups
    path = tmp_path / "old.ckpt"
    torch.save(old, path)
    with caplog.at_level("WARNING"):
        loaded, model, _ = load_run(str(path))
    assert loaded.loss.lr == 0.01 and "loss.lr=0.01 taken from today's defaults" in caplog.text
    old["rewardlab_config"]["optimizer"] = {  # trained under Adafactor: eval and export still load it
        "_target_": "torch.optim.Adafactor", "_partial_": True, "_convert_": "all", "lr": 1e-2, "beta2_decay": -0.8,
        "eps": [None, 1e-3], "d": 1.0, "weight_decay": 0.0,
    }  # fmt: skip
    torch.save(old, tmp_path / "adafactor.ckpt")
    assert load_run(str(tmp_path / "adafactor.ckpt"))[0].optimizer._target_ == "torch.optim.Adafactor"
    for allow in ("false", "true"):
        steps = ["trainer.max_steps=4", "trainer.max_epochs=4", "test=false"]
        resume = make_cfg("loss=bt_ties", "data.ties=keep", *TIES, *steps, f"ckpt_path={path}",
                          f"resume.allow_changes={allow}", folder=f"r{allow}")  # fmt: skip
        with pytest.raises(ConfigError, match="its optimizer has no group for the loss's own parameter, and this"):
            train(resume)
    new = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"  # and a loss change across the group, both ways
    plain = make_cfg("trainer.max_steps=2", "trainer.max_epochs=2", "test=false", *TIES[:2], folder="plain")
    train(plain)
    for ckpt, loss, says in [(new, "loss=bradley_terry", "has a group .* learns no parameter"),
                             (Path(plain.paths.output_dir) / "checkpoints" / "last.ckpt", "loss=bt_ties",
                              "has no group .* learns a parameter")]:  # fmt: skip
        resume = make_cfg(loss, "data.ties=keep", *TIES, "trainer.max_steps=4", "trainer.max_epochs=4", "test=false",
                          f"ckpt_path={ckpt}", "resume.allow_changes=true", folder=f"r-{loss}")  # fmt: skip
        with pytest.raises(ConfigError, match=says):
            train(resume)
