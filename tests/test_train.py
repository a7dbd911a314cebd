"""End to end: a tiny model learns, a run folder holds results and checkpoints, resuming works."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rewardlab import synthetic
from rewardlab.train import train

from .conftest import ROOT

RESULT_KEYS = {
    "val/acc",
    "val/loss",
    "val/acc_best",
    "test/acc",
    "test/loss",
    "train/pairs_per_s",
    "train/tokens_per_s",
    "train/padding_efficiency",
    "peak_rss_mb",
    "wall_s",
    "params/total",
    "params/trainable",
    "global_step",
}


def run_cli(
    *args: str, module: str = "rewardlab.train", cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` in a fresh process, as a user runs it (`env`: extra variables)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_tiny_model_learns_a_task_to_high_held_out_accuracy(make_cfg, tmp_path):
    synthetic.write_splits(tmp_path / "d", {"train": 2000, "val": 300, "test": 300}, tasks=["compare"])
    cfg = make_cfg(
        f"data.train_file={tmp_path}/d/train.jsonl",
        f"data.val_file={tmp_path}/d/val.jsonl",
        f"data.test_file={tmp_path}/d/test.jsonl",
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=1.0",
        "trainer.limit_val_batches=1.0",
        "trainer.limit_test_batches=1.0",
    )
    results = train(cfg)
    assert results["val/acc_best"] >= 0.80 and results["test/acc"] >= 0.80
    assert results["train/loss"] < 0.5 < 0.6931  # well below ln 2, the loss of a model that learned nothing
    outcomes = (Path(cfg.paths.output_dir) / "test_pairs.csv").read_text().splitlines()
    assert outcomes[0] == "row,correct,margin" and len(outcomes) == 1 + 300  # every test pair, once, by file row
    rows = [line.split(",") for line in outcomes[1:]]
    assert [int(r[0]) for r in rows] == list(range(1, 301))
    assert sum(int(r[1]) for r in rows) / 300 == pytest.approx(results["test/acc"], abs=1e-6)
    assert all(int(r[1]) == (float(r[2]) > 0) for r in rows)
    content = (tmp_path / "d" / "test.jsonl").read_bytes()  # the split's name, then the file's content alone
    assert results["test/data_hash"] == hashlib.sha256(b"test" + content).hexdigest()


def test_run_writes_results_and_checkpoints_and_resumes(tmp_path, cache_dir):
    run = tmp_path / "run"
    common = ["logger=csv", "debug=limit", f"paths.cache_dir={cache_dir}", "~callbacks.progress_bar"]
    done = run_cli(*common, f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert RESULT_KEYS <= set(results)
    assert results["global_step"] == 40  # 2 epochs × limit_train_batches=20
    assert results["params/trainable"] == results["params/total"] > 100_000
    assert 0 < results["train/padding_efficiency"] <= 1 and results["train/pairs_per_s"] > 0
    ckpts = {p.name for p in (run / "checkpoints").iterdir()}
    assert "last.ckpt" in ckpts and any(n.startswith("best-") for n in ckpts)
    assert (run / ".hydra" / "config.yaml").exists() and (run / "train.log").exists()
    assert (run / "csv" / "version_0" / "metrics.csv").exists()
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 40 and saved["rewardlab_config"]["data"]["max_length"] == 256

    resumed = tmp_path / "resumed"
    again = run_cli(
        *common,
        f"hydra.run.dir={resumed}",
        f"ckpt_path={run}/checkpoints/last.ckpt",
        "trainer.max_epochs=3",
        "resume.allow_changes=true",  # a longer schedule changes what is trained
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((resumed / "results.json").read_text())["global_step"] == 60
    assert "Restoring states from the checkpoint" in again.stdout + again.stderr


@pytest.mark.slow
def test_default_run_reaches_the_documented_accuracy(tmp_path, cache_dir):
    """What `make train` runs (minus the progress bar), on the embedded quiz data."""
    run = tmp_path / "run"
    done = run_cli("logger=csv", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["val/acc_best"] >= 0.80 and results["test/acc"] >= 0.80
