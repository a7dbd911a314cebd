"""Real multiruns in subprocesses: one run per option, separate wandb runs, a report that compares
them (failed jobs included), DDP on two CPU processes, an Optuna search and parallel jobs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from rewardlab.report import load_jobs, report, varied

from .test_train import run_cli

QUICK = [
    "trainer.max_steps=6",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.num_sanity_val_steps=0",
    "~callbacks.progress_bar",
]


def wandb_runs(job: Path) -> list[Path]:
    return list(job.glob("wandb/offline-run-*/run-*.wandb"))


def test_freeze_sweep_gives_one_run_per_option_and_a_report(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    done = run_cli(
        "-m",
        "backbone=tiny",
        "freeze=full,last_n,head_only,lora",
        f"paths.cache_dir={cache_dir}",
        f"hydra.sweep.dir={sweep}",
        *QUICK,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = load_jobs(sweep)
    assert [j.overrides["freeze"] for j in jobs] == ["full", "last_n", "head_only", "lora"]
    assert varied(jobs) == ["freeze"]
    trainable = {j.overrides["freeze"]: j.results["params/trainable"] for j in jobs}
    assert (
        trainable["full"] > trainable["last_n"] > trainable["head_only"] == 64 and trainable["lora"] < trainable["full"]
    )
    for job in jobs:  # one finished offline wandb run per job, grouped by the sweep
        assert len(wandb_runs(job.folder)) == 1
        config = yaml.safe_load((job.folder / ".hydra" / "config.yaml").read_text())
        assert config["logger"]["wandb"]["group"] == "${rl_sweep_group:}"
        debug = next(job.folder.glob("wandb/offline-run-*/logs/debug.log")).read_text()
        assert "'group': 'sweep'" in debug and f"freeze={job.overrides['freeze']}" in debug
        assert f"'job_type': 'freeze={job.overrides['freeze']}'" in debug  # the swept key only
        assert "got exitcode: 0" in debug

    for job in jobs:  # each job's per-pair test outcomes, for the report's paired tests
        outcomes = list(csv.DictReader(open(job.folder / "test_pairs.csv")))
        assert len({o["row"] for o in outcomes}) == len(outcomes) > 0
        assert sum(int(o["correct"]) for o in outcomes) / len(outcomes) == pytest.approx(job.results["test/acc"])
    text = report(sweep)
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0].startswith("| freeze | seeds | failed | acc (95% CI) | Δ vs best, points (95% CI) | p vs best |")
    assert [line.split(" | ")[1:3] for line in table[2:]] == [["1", "0"]] * 4  # one seed each, none failed
    rows = list(csv.DictReader(open(sweep / "report.csv")))
    assert [r["freeze"] for r in rows] == ["full", "last_n", "head_only", "lora"]
    assert all(r["p_vs_best"] or float(r["acc_mean"]) == max(float(x["acc_mean"]) for x in rows) for r in rows)
    assert (sweep / "report.md").exists() and (sweep / "report.png").stat().st_size > 10_000

    cli = run_cli(str(sweep), module="rewardlab.report")
    assert cli.returncode == 0 and "| head_only | 1 | 0 |" in cli.stdout


def test_failed_jobs_are_failed_rows_not_gaps(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    done = run_cli(
        "-m",
        "freeze=head_only,bitfit",
        f"paths.cache_dir={cache_dir}",
        "logger=none",
        f"hydra.sweep.dir={sweep}",
        *QUICK,
    )
    assert done.returncode != 0  # bitfit cannot apply to the bias-free tiny Llama
    text = report(sweep)
    assert "| head_only | 1 | 0 |" in text and "| bitfit | 0 | 1 |" in text
    jobs = (sweep / "report.md").read_text().split("## Jobs")[1]
    assert "| 0 | head_only | ok |" in jobs and "| 1 | bitfit | failed: " in jobs and "no bias parameters" in jobs


def test_ddp_on_two_cpu_processes(tmp_path, cache_dir):
    run = tmp_path / "run"
    done = run_cli("trainer=ddp_cpu", "logger=csv", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}", *QUICK)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["global_step"] == 6 and 0 <= results["val/acc"] <= 1
    assert "distributed_backend=gloo" in done.stdout + done.stderr and "All distributed processes registered" in (
        done.stdout + done.stderr
    )
    assert len(list(run.rglob("results.json"))) == 1  # rank 0 alone writes results


def test_ddp_batch_size_must_divide_by_the_world_size(tmp_path, cache_dir):
    done = run_cli(
        "trainer=ddp_cpu",
        "data.batch_size=15",
        "logger=none",
        f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={tmp_path / 'run'}",
        *QUICK,
    )
    assert done.returncode != 0
    assert "data.batch_size=15 must divide by the world size 2" in done.stdout + done.stderr


@pytest.mark.slow
def test_optuna_search_runs_trials_and_reports_the_best(tmp_path, cache_dir):
    sweep = tmp_path / "optuna"
    done = run_cli(
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.n_startup_trials=2",
        "logger=none",
        f"paths.cache_dir={cache_dir}",
        f"hydra.sweep.dir={sweep}",
        *QUICK,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    accs = [json.loads(p.read_text())["val/acc_best"] for p in sweep.glob("*/results.json")]
    assert len(accs) == 3 and best["best_value"] == pytest.approx(max(accs))
    assert set(best["best_params"]) == {"recipe.lr_scale", "optimizer.weight_decay", "model.head_lr_mult"}


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path, cache_dir):
    sweep = tmp_path / "joblib"
    done = run_cli(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "optimizer.lr=1e-3,2e-3",
        "logger=wandb",
        f"paths.cache_dir={cache_dir}",
        f"hydra.sweep.dir={sweep}",
        *QUICK,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = load_jobs(sweep)
    assert [j.ok for j in jobs] == [True, True] and varied(jobs) == ["optimizer.lr"]
    assert all(len(wandb_runs(j.folder)) == 1 for j in jobs)
