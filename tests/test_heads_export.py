"""Heads beyond one linear layer after training: eval's length and uncertainty analyses, the export (one
logit: the ensemble's mean or ODIN's quality; an ensemble's heads carried), and uncertainty in `score`
and `serve`; a tampered heads file is refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rewardlab.data.batching import pad_sequences
from rewardlab.eval import evaluate
from rewardlab.export import export
from rewardlab.run import load_run
from rewardlab.score import score_file
from rewardlab.scoring import HEADS_FILE, Scorer, UntrustedExport
from rewardlab.serve import serving
from rewardlab.train import train

from .conftest import compose_config
from .test_serve import SERVER, post

QUIZ = Path(__file__).resolve().parent.parent / "rewardlab" / "assets" / "quiz"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Path]:
    """A tiny decoder with each head, trained for 30 steps and exported: {head: run folder}."""
    out = {}
    for head in ("linear", "ensemble", "odin"):
        run = tmp_path_factory.mktemp(f"run-{head}")
        overrides = ["logger=none", "trainer.max_steps=30", "trainer.limit_val_batches=4", "~callbacks.progress_bar"]
        results = train(compose_config("train", [*overrides, f"head={head}"], run, cache_dir))
        assert 0 <= results["test/acc_length_controlled"] <= 1 and ("test/uncertainty_auroc" in results) == (
            head == "ensemble"
        )
        export(compose_config("export", [f"ckpt_path={run}/checkpoints/last.ckpt", f"output_dir={run}/rm"],
                              run / "x", cache_dir))  # fmt: skip
        out[head] = run
    return out


def sequences(scorer: Scorer, n: int) -> list[list[int]]:
    rows = [json.loads(line) for line in (QUIZ / "test.jsonl").read_text().splitlines()[:n]]
    return [scorer.encode(r["prompt"], r[side])[1] for r in rows for side in ("chosen", "rejected")]


@pytest.mark.parametrize("head", ["ensemble", "odin"])
def test_the_export_gives_the_heads_reward_and_an_ensemble_its_spread(head, runs):
    run = runs[head]
    info = json.loads((run / "rm" / "config.json").read_text())["rewardlab"]
    _, model, _ = load_run(str(run / "checkpoints" / "last.ckpt"))
    scorer = Scorer(str(run / "rm"), False, 4)
    seqs = sequences(scorer, 5)
    with torch.no_grad():
        outputs = model.outputs(*pad_sequences(seqs, 0))
    assert np.allclose(scorer.score(seqs), model.head.reward(outputs).numpy(), atol=1e-4)
    assert info["parity_max_abs_diff"] < 1e-4
    if head == "odin":  # the quality output alone; nothing more to carry
        assert info["head"] == {"kind": "odin", "outputs": 2, "file": None, "module": None, "dtype": None}
        assert not scorer.has_std and not (run / "rm" / HEADS_FILE).exists()
        return
    assert info["head"] == {"kind": "ensemble", "outputs": 4, "file": HEADS_FILE, "module": "score", "dtype": "float32"}
    both = scorer.score(seqs, with_std=True)
    assert both.shape == (10, 2) and np.allclose(both[:, 0], scorer.score(seqs), atol=1e-6)
    assert np.allclose(both[:, 1], model.head.uncertainty(outputs).numpy(), atol=1e-4) and both[:, 1].min() > 0


@pytest.mark.parametrize("saved, loaded", [("bfloat16", "float32"), ("float32", "bfloat16")])
def test_an_ensemble_exported_in_one_dtype_scores_in_another(saved, loaded, runs, tmp_path, cache_dir):
    ckpt = runs["ensemble"] / "checkpoints" / "last.ckpt"
    overrides = [f"ckpt_path={ckpt}", f"output_dir={tmp_path}/rm", f"dtype={saved}"]
    export(compose_config("export", overrides, tmp_path / "x", cache_dir))
    scorer = Scorer(str(tmp_path / "rm"), False, 4, loaded)
    reference = Scorer(str(runs["ensemble"] / "rm"), False, 4)
    seqs = sequences(scorer, 4)
    both, exact = scorer.score(seqs, with_std=True), reference.score(seqs, with_std=True)
    assert scorer.has_std and np.allclose(both, exact, atol=0.05)


def test_a_linear_export_has_no_heads_file_and_no_spread(runs):
    scorer = Scorer(str(runs["linear"] / "rm"), False, 4)
    assert not scorer.has_std and not (runs["linear"] / "rm" / HEADS_FILE).exists()
    with pytest.raises(ValueError, match="one head"):
        scorer.score(sequences(scorer, 1), with_std=True)


def tampered(runs: dict[str, Path], tmp_path: Path) -> Path:
    folder = tmp_path / "rm"
    shutil.copytree(runs["ensemble"] / "rm", folder)
    return folder


def edit_head_info(folder: Path, replace: object = None, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["rewardlab"]["head"] = replace if replace is not None else config["rewardlab"]["head"] | changes
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "attack, says",
    [
        ("other weights", "mean of its heads is not the model's reward head"),
        ("not safetensors", "not a rewardlab heads file"),
        ("missing", "not a rewardlab heads file"),
        ("one head", "expected weights of shape (rewardlab.head.outputs, hidden) = (4, "),
        ("a module that is not the head", "is not the model's reward head"),
        ("an attribute that is no module", "is not the model's reward head"),
        ("another file name", "rewardlab.head.file is '../../elsewhere.safetensors', expected"),
        ("an extra tensor", "expected one float32 tensor 'weight'"),
        ("float16 heads", "expected one float32 tensor 'weight'"),
        ("outputs that lie", "expected weights of shape (rewardlab.head.outputs, hidden) = (99, "),
        ("outputs as text", "rewardlab.head.outputs is '4', expected an integer >= 2"),
        ("NaN weights", "holds weights that are not finite"),
        ("an unknown kind", "is not what rewardlab.export writes"),
        ("a heads file without its entry", "has no rewardlab.head entry"),
        ("a head entry that is no mapping", "is not what rewardlab.export writes"),
        ("an ensemble without its file", "rewardlab.head.file is None"),
        ("an export without the saved dtype", "rewardlab.head.dtype is None"),
        ("a single head with a heads file beside it", "carries no heads file"),
        ("a heads file of an older rewardlab", "records no rewardlab.head entry"),
        ("an entry edited in the heads file", "rewardlab.head differs from the entry"),
        ("an unreadable entry in the heads file", "rewardlab.head differs from the entry"),
    ],
)
def test_a_heads_file_or_entry_that_does_not_match_the_model_is_refused(attack, says, runs, tmp_path):
    folder = tampered(runs, tmp_path)
    weight = load_file(folder / HEADS_FILE)["weight"]
    if attack == "other weights":
        save_file({"weight": weight * 2}, folder / HEADS_FILE)
    elif attack == "not safetensors":
        (folder / HEADS_FILE).write_bytes(b"\x80\x04import os; os.system('touch PWNED')")
    elif attack == "missing":
        (folder / HEADS_FILE).unlink()
    elif attack == "one head":
        save_file({"weight": weight[:1].contiguous()}, folder / HEADS_FILE)
    elif attack == "a module that is not the head":
        edit_head_info(folder, module="model.layers.0.mlp.up_proj")
    elif attack == "an attribute that is no module":
        edit_head_info(folder, module="__class__")
    elif attack == "another file name":
        edit_head_info(folder, file="../../elsewhere.safetensors")
    elif attack == "an extra tensor":
        save_file({"weight": weight, "evil": torch.zeros(1)}, folder / HEADS_FILE)
    elif attack == "float16 heads":
        save_file({"weight": weight.half()}, folder / HEADS_FILE)
    elif attack == "outputs that lie":
        edit_head_info(folder, outputs=99)
    elif attack == "outputs as text":
        edit_head_info(folder, outputs="4")
    elif attack == "NaN weights":
        save_file({"weight": weight * float("nan")}, folder / HEADS_FILE)
    elif attack == "an unknown kind":
        edit_head_info(folder, kind="banana", file=None)
    elif attack == "a heads file without its entry":
        config = json.loads((folder / "config.json").read_text())
        del config["rewardlab"]["head"]
        (folder / "config.json").write_text(json.dumps(config))
    elif attack == "a head entry that is no mapping":
        edit_head_info(folder, replace="ensemble")
    elif attack == "an ensemble without its file":
        edit_head_info(folder, file=None)
    elif attack == "an export without the saved dtype":
        edit_head_info(folder, dtype=None)
    elif attack == "a heads file of an older rewardlab":
        save_file({"weight": weight}, folder / HEADS_FILE)
    elif attack == "an entry edited in the heads file":
        entry = json.loads((folder / "config.json").read_text())["rewardlab"]["head"] | {"dtype": "bfloat16"}
        save_file({"weight": weight}, folder / HEADS_FILE, metadata={"rewardlab.head": json.dumps(entry)})
    elif attack == "an unreadable entry in the heads file":
        save_file({"weight": weight}, folder / HEADS_FILE, metadata={"rewardlab.head": "[" * 100_000})
    else:
        edit_head_info(folder, kind="linear", file=None)
    with pytest.raises(UntrustedExport, match=re.escape(says)):
        Scorer(str(folder), False, 4)


def test_score_writes_each_responses_spread_for_an_ensemble(runs, tmp_path, cache_dir):
    rows = [json.loads(line) for line in (QUIZ / "test.jsonl").read_text().splitlines()[:6]]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_config(
        "score",
        [f"model_dir={runs['ensemble'] / 'rm'}", f"input={tmp_path / 'in.jsonl'}", f"output={tmp_path / 'out.jsonl'}"],
        tmp_path / "s",
        cache_dir,
    )
    assert score_file(cfg) == {"rows": 6, "scored": 6, "errors": 0}
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    scorer = Scorer(str(runs["ensemble"] / "rm"), False, 4)
    expected = scorer.score(sequences(scorer, 6), with_std=True)
    assert np.allclose([[o["reward"][s] for s in ("chosen", "rejected")] for o in out], expected[:, 0].reshape(6, 2),
                       atol=1e-4)  # fmt: skip
    assert np.allclose([[o["reward_std"][s] for s in ("chosen", "rejected")] for o in out],
                       expected[:, 1].reshape(6, 2), atol=1e-4)  # fmt: skip


@pytest.mark.parametrize("head", ["ensemble", "linear"])
def test_serve_answers_uncertainties_for_an_ensemble_only(head, runs, tmp_path, cache_dir):
    cfg = compose_config("serve", [f"model_dir={runs[head] / 'rm'}", "port=0", *SERVER], tmp_path / "s", cache_dir)
    scorer = Scorer(str(runs[head] / "rm"), False, 4)
    texts = ["[BOS]Is 3 even or odd?[SEP]odd[EOS]", "[BOS]Is 4 even or odd?[SEP]odd[EOS]"]
    with serving(cfg) as url:
        status, answer = post(url, {"query": texts})
    assert status == 200
    expected = scorer.score([scorer.encode_text(t)[1] for t in texts], with_std=scorer.has_std)
    if head == "linear":
        assert set(answer) == {"rewards"} and np.allclose(answer["rewards"], expected, atol=1e-4)
    else:
        assert set(answer) == {"rewards", "uncertainties"}
        assert np.allclose(answer["rewards"], expected[:, 0], atol=1e-4)
        assert np.allclose(answer["uncertainties"], expected[:, 1], atol=1e-4)


@pytest.mark.parametrize("std", [-1.0, "1", None, float("nan"), True, 0.0])
def test_statistics_that_cannot_normalise_are_not_used_and_serve_refuses_to_normalise_with_them(
    std, runs, tmp_path, cache_dir
):
    folder = tampered(runs, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["reward_std"] = std
    (folder / "config.json").write_text(json.dumps(config))
    scorer = Scorer(str(folder), False, 4)
    assert scorer.std is None and scorer.normalized(1.0) is None
    cfg = compose_config(
        "serve", [f"model_dir={folder}", "port=0", "normalize=true", *SERVER], tmp_path / "s", cache_dir
    )
    with pytest.raises(ValueError, match="normalize=true: .*no usable reward_mean and reward_std"):
        with serving(cfg):
            pass


def test_eval_reports_length_control_calibration_and_an_ensembles_uncertainty(runs, tmp_path, cache_dir):
    ckpt = runs["ensemble"] / "checkpoints" / "last.ckpt"
    cfg = compose_config("eval", [f"ckpt_path={ckpt}", "logger=none", "length_calibration=val"], tmp_path, cache_dir)
    result = evaluate(cfg, [])
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["acc_length_controlled"] == pytest.approx(
        (saved["acc_chosen_longer"] + saved["acc_chosen_shorter"]) / 2
    )
    assert sum(b["pairs"] for b in saved["accuracy_by_length_gap"]) == saved["pairs"] == 500
    by_quantile = saved["accuracy_by_uncertainty"]
    assert len(by_quantile) == 4 and sum(q["pairs"] for q in by_quantile) == 500
    assert 0 <= saved["uncertainty_auroc"] <= 1 and saved["uncertainty_mean"] > 0
    assert saved["length_calibrated"]["split"] == "val" and 0 <= saved["length_calibrated"]["accuracy"] <= 1
    assert result["accuracy"] == saved["accuracy"]
    first = json.loads((tmp_path / "rewards.jsonl").read_text().splitlines()[0])
    assert {"uncertainty", "chosen_std", "rejected_std"} <= set(first)
