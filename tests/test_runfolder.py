"""Runs never overwrite or mix results: one process per run folder, finished runs stay finished,
and a resumed run trains what its checkpoint trained unless told otherwise."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rewardlab.checkpoints import UntrustedCheckpoint
from rewardlab.runfolder import LOCK_FILE, RunFolder, RunFolderError
from rewardlab.train import train

from .test_train import run_cli

STEPS = ["trainer.max_steps=4", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2"]
CLI = [*STEPS, "logger=none", "~callbacks.progress_bar"]


def test_a_held_run_folder_refuses_a_second_holder_and_a_dead_holder_leaves_a_stale_lock(tmp_path, caplog):
    first = RunFolder(tmp_path)
    first.claim()
    with pytest.raises(RunFolderError, match=rf"is in use by pid {os.getpid()} on .* since"):
        RunFolder(tmp_path).claim()
    first.release()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from rewardlab.runfolder import RunFolder; RunFolder({str(tmp_path)!r}).claim(); "
         "print('held', flush=True); import time; time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunFolderError, match=f"pid {holder.pid}"):
        RunFolder(tmp_path).claim()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert f"pid {holder.pid}" in (tmp_path / LOCK_FILE).read_text()  # the dead holder's note is left
    with caplog.at_level("INFO"):
        RunFolder(tmp_path).claim()
    assert f"took over a stale lock (its holder, pid {holder.pid}" in caplog.text


def test_a_second_process_in_a_held_run_folder_stops_at_once_and_writes_nothing(tmp_path, cache_dir):
    run = tmp_path / "run"
    holder = RunFolder(run)
    holder.claim()
    done = run_cli(f"hydra.run.dir={run}", f"paths.cache_dir={cache_dir}", *CLI, timeout=120)
    assert done.returncode != 0 and f"is in use by pid {os.getpid()}" in done.stderr
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # no .hydra/, no log, no checkpoint
    holder.release()
    done = run_cli(f"hydra.run.dir={run}", f"paths.cache_dir={cache_dir}", *CLI)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "results.json").exists() and (run / ".hydra" / "overrides.yaml").exists()


def test_a_finished_run_resumed_again_is_reported_complete_and_its_results_stay(make_cfg, caplog):
    results = train(make_cfg(*STEPS))
    path = Path(make_cfg().paths.output_dir) / "results.json"
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    with caplog.at_level("INFO"):
        again = train(make_cfg(*STEPS, "ckpt_path=last"))
    assert again == results and (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert "holds a finished run (results.json): nothing to do" in caplog.text


def test_a_new_run_never_writes_into_a_folder_that_holds_another(make_cfg):
    train(make_cfg(*STEPS))
    with pytest.raises(RunFolderError, match="already holds a run \\(results.json\\).*resume it with ckpt_path=last"):
        train(make_cfg(*STEPS, "seed=7"))
    folder = Path(make_cfg().paths.output_dir)
    (folder / "results.json").unlink()  # an interrupted run: checkpoints, no results
    with pytest.raises(RunFolderError, match="already holds a run \\(checkpoints\\)"):
        train(make_cfg(*STEPS))


@pytest.fixture
def checkpoint(make_cfg) -> str:
    """A run stopped by max_steps on the last batch of its epoch (Lightning alone would resume it into an
    empty epoch)."""
    train(make_cfg(*STEPS))
    return str(Path(make_cfg().paths.output_dir) / "checkpoints" / "last.ckpt")


def test_resuming_with_other_settings_is_refused_naming_each_change(checkpoint, make_cfg, tmp_path):
    cfg = make_cfg(*STEPS, f"ckpt_path={checkpoint}", "optimizer.lr=0.01", "data.max_length=128", "loss=margin")
    cfg.paths.output_dir = str(tmp_path / "resumed")
    with pytest.raises(ValueError, match="would train differently") as err:
        train(cfg)
    message = str(err.value)
    assert "optimizer.lr: 0.002 -> 0.01" in message and "data.max_length: 256 -> 128" in message
    assert "loss._target_: 'rewardlab.losses.BradleyTerry' -> 'rewardlab.losses.MarginBradleyTerry'" in message
    assert "resume.allow_changes=true" in message


def test_allowed_changes_really_apply(checkpoint, make_cfg, tmp_path):
    lrs = tmp_path / "lrs.txt"
    cfg = make_cfg(
        "trainer.max_steps=8",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "trainer.max_epochs=2",
        f"ckpt_path={checkpoint}",
        "optimizer.lr=0.5",
        "scheduler=constant",
        "scheduler.warmup=0",
        "resume.allow_changes=true",
        "+callbacks.lrs._target_=tests.helpers.RecordLearningRates",
        f"+callbacks.lrs.path={lrs}",
    )
    cfg.paths.output_dir = str(tmp_path / "resumed")
    results = train(cfg)
    first = [float(x) for x in lrs.read_text().splitlines()[0].split()]
    assert first == [0.5] * len(first) and results["global_step"] == 8
    saved = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["rewardlab_config"]["optimizer"]["lr"] == 0.5


def test_changes_a_checkpoint_cannot_take_are_refused_even_when_allowed(checkpoint, make_cfg, tmp_path):
    cfg = make_cfg(*STEPS, f"ckpt_path={checkpoint}", "backbone.num_layers=3", "resume.allow_changes=true")
    cfg.paths.output_dir = str(tmp_path / "resumed")
    with pytest.raises(ValueError, match="cannot take these: backbone.num_layers: 2 -> 3$"):
        train(cfg)


def test_a_checkpoint_that_would_run_code_on_resume_is_refused(make_cfg, tmp_path):
    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "PWNED",))

    torch.save({"state_dict": {}, "evil": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(UntrustedCheckpoint, match="evil.ckpt: not a rewardlab checkpoint: not a file of tensors"):
        train(make_cfg(*STEPS, f"ckpt_path={tmp_path / 'evil.ckpt'}"))
    assert not (tmp_path / "PWNED").exists()


def test_other_commands_never_write_into_a_training_run_folder(checkpoint, make_cfg, tmp_path, cache_dir):
    from rewardlab.export import main as export_main

    run = Path(make_cfg().paths.output_dir)
    before = (run / ".hydra").exists(), sorted(p.name for p in run.iterdir())
    done = run_cli(
        f"ckpt_path={checkpoint}", f"output_dir={tmp_path / 'rm'}", f"hydra.run.dir={run}", module="rewardlab.export"
    )
    assert done.returncode == 1 and "already holds a run (checkpoints)" in done.stderr
    assert (run / ".hydra").exists() == before[0] and sorted(p.name for p in run.iterdir()) == before[1]
    assert export_main  # the command exists as a module entry point


def test_a_checkpoint_of_another_run_never_resumes_into_an_unfinished_folder(checkpoint, make_cfg, tmp_path):
    unfinished = make_cfg(*STEPS, folder="other")
    Path(unfinished.paths.output_dir, "checkpoints").mkdir(parents=True)  # what an interrupted run leaves
    cfg = make_cfg(*STEPS, f"ckpt_path={checkpoint}", folder="other")
    with pytest.raises(RunFolderError, match="already holds a run \\(checkpoints\\)"):
        train(cfg)


def test_a_sweep_never_writes_into_another_sweeps_folder(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    first = run_cli("-m", "seed=1", f"hydra.sweep.dir={sweep}", f"paths.cache_dir={cache_dir}", *CLI)
    assert first.returncode == 0, first.stderr[-2000:]
    multirun = (sweep / "multirun.yaml").read_bytes()
    again = run_cli("-m", "seed=2", f"hydra.sweep.dir={sweep}", f"paths.cache_dir={cache_dir}", *CLI)
    assert again.returncode != 0 and "already holds a sweep" in again.stderr
    assert (sweep / "multirun.yaml").read_bytes() == multirun and not (sweep / "1").exists()
