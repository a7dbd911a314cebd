"""Dirty data, interruptions, non-finite losses, distributed runs, secrets and load: nothing is lost."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, InstantiationException, MissingConfigException
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rewardlab import losses
from rewardlab.callbacks import AtomicCheckpointIO
from rewardlab.data.cache import PairDataset, Settings, build_cache
from rewardlab.redaction import redact
from rewardlab.run import build_trainer
from rewardlab.train import train

from .conftest import CONF
from .data.common import COLUMNS, datamodule, ready
from .test_configs import wandb_exit_code
from .test_train import run_cli

# ------------------------------------------------------------------------------------- bad input

TEXT = st.text(st.characters(codec="utf-8"), max_size=60) | st.text(max_size=3000).map(lambda s: s * 3)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)
ROW = st.fixed_dictionaries(
    {"prompt": TEXT | JSON, "chosen": TEXT | JSON, "rejected": TEXT | JSON},
    optional={"margin": JSON, "subset": JSON},
)
LINE = ROW.map(lambda r: json.dumps(r).encode()) | JSON.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=80)


def counted_as_a_row(line: bytes, first: bool = False) -> bool:
    """The reader skips blank lines (not rows) and a file's leading UTF-8 byte-order mark; anything else,
    valid or not, is a row. Blank means JSON's whitespace only: a vertical tab is a (bad) row."""
    if first:
        line = line.removeprefix(b"\xef\xbb\xbf")
    try:
        return bool(line.decode("utf-8").strip(" \t\r\n"))
    except UnicodeDecodeError:
        return True


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(lines=st.lists(LINE.map(lambda b: b.replace(b"\n", b" ")), min_size=1, max_size=30))
@example(lines=[b"\xef\xbb\xbf"])  # a file holding only a byte-order mark: no row (found by this test)
@example(lines=[b"\x0b", b"\x0c \t", b"\xe2\x80\xa8"])  # VT, FF, U+2028: rows, not blank (found by CI)
def test_every_row_read_is_used_or_reported(lines, tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("prop")
    source = folder / "train.jsonl"
    source.write_bytes(b"".join(line + b"\n" for line in lines))
    s = Settings("explicit", "sep", None, COLUMNS, 48, "truncate", "skip", "text", "skip", "all", 0.0, {"score": 1.0})
    build_cache(str(source), "train", tiny_tokenizer, s, folder / "cache")
    dataset = PairDataset(folder / "cache")
    counts = dataset.meta["counts"]
    reported = (folder / "cache" / "bad_rows.jsonl").read_text(encoding="utf-8").split("\n")[:-1]
    rows = [n for n, line in enumerate(lines, start=1) if counted_as_a_row(line, first=n == 1)]
    assert counts.get("read", 0) == len(rows)
    assert counts.get("used", 0) == len(dataset) and len(dataset) + len(reported) == len(rows)
    where = {int(json.loads(r)["where"].rsplit(":", 1)[1]) for r in reported}
    used = {rows[i] for i in dataset.row}  # row indices count rows in reading order
    assert where.isdisjoint(used) and where | used == set(rows)  # each row exactly once, used or reported
    assert all(json.loads(r)["reason"] for r in reported)


def test_a_row_far_beyond_max_length_is_truncated_or_dropped_and_counted(tmp_path, tiny_tokenizer):
    huge = {"prompt": "why " * 50_000, "chosen": "because " * 50_000 + "yes", "rejected": "no"}
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(huge) + "\n" + '{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    dm = ready(datamodule(tiny_tokenizer, tmp_path, train_file=str(path), max_length=64))
    train = dm.datasets["train"]
    assert len(train) == 2 and train.seq_lengths.max() == 64
    counts = dm.counts()
    assert counts["data/train/truncated"] == 1 and counts["data/train/read"] == 2
    assert tiny_tokenizer.decode(train[0]["chosen"][-4:]).endswith("yes[EOS]")  # the response keeps its end
    dropped = ready(datamodule(tiny_tokenizer, tmp_path, train_file=str(path), max_length=64, truncation="drop"))
    assert len(dropped.datasets["train"]) == 1 and dropped.counts()["data/train/dropped"] == 1
    assert '"code": "too_long"' in (tmp_path / "run" / "bad_rows.jsonl").read_text()


def test_skipped_rows_are_counted_in_the_results(make_cfg, tmp_path):
    good = [json.dumps({"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"}) for i in range(40)]
    path = tmp_path / "dirty.jsonl"
    path.write_text("\n".join([*good, "{broken", '{"prompt": "p", "chosen": "same", "rejected": "same"}']) + "\n")
    results = train(make_cfg(f"data.train_file={path}", f"data.val_file={path}", "data.on_bad_row=skip", "test=false"))
    assert (results["data/train/read"], results["data/train/used"], results["data/train/skipped"]) == (42, 40, 2)
    lines = (tmp_path / "run" / "bad_rows.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["code"] for line in lines) == [
        "identical",
        "identical",
        "invalid_json",
        "invalid_json",
    ]


def test_unknown_config_keys_and_options_are_named():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match="Could not override 'data.max_lenght'") as err:
            compose("train", overrides=["data.max_lenght=5"])
        assert "Key 'max_lenght' is not in struct" in str(err.value.__cause__)
        with pytest.raises(MissingConfigException, match="Could not find 'freeze/fulll'") as err:
            compose("train", overrides=["freeze=fulll"])
        assert "Available options in 'freeze'" in str(err.value) and "head_only" in str(err.value)


def test_a_backbone_path_that_does_not_exist_is_named(make_cfg, tmp_path):
    with pytest.raises(InstantiationException, match=r"backbone.name_or_path: no such folder '.*/nowhere'"):
        train(make_cfg("backbone=hf", f"backbone.name_or_path={tmp_path}/nowhere"))


def test_a_checkpoint_path_that_does_not_exist_is_named(make_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt_path: no such checkpoint"):
        train(make_cfg(f"ckpt_path={tmp_path}/missing.ckpt"))


# ---------------------------------------------------------------------------------- interruptions

# 2 epochs of 12 batches, last.ckpt every 5 steps, dropout on (so the random generator's state matters).
RESUMABLE = [
    "logger=none",
    "~callbacks.progress_bar",
    "test=false",
    "data.batch_size=8",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=12",
    "trainer.limit_val_batches=2",
    "trainer.num_sanity_val_steps=0",
    "callbacks.last_checkpoint.every_n_train_steps=5",
    "backbone.dropout=0.1",
    "model.disable_dropout=false",
]
SAME = ["val/loss", "val/acc", "val/acc_best", "train/loss", "train/acc"]


def signal_at(step: int, signum: int) -> list[str]:
    return [
        "+callbacks.kill._target_=tests.helpers.SignalAt",
        f"+callbacks.kill.step={step}",
        f"+callbacks.kill.signum={signum}",
    ]


def final_state(run: Path) -> tuple[dict, dict]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return json.loads((run / "results.json").read_text()), ckpt["state_dict"]


def assert_same_run(a: Path, b: Path) -> None:
    """Same metrics and weights; measured: bit-identical on CPU (tolerance 1e-6 all the same)."""
    (ra, wa), (rb, wb) = final_state(a), final_state(b)
    assert ra["global_step"] == rb["global_step"] == 24
    for key in SAME:
        assert rb[key] == pytest.approx(ra[key], abs=1e-6), key
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) <= 1e-6


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted")
    done = run_cli(*RESUMABLE, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def test_sigkill_mid_epoch_then_resume_matches_the_uninterrupted_run(uninterrupted, tmp_path, cache_dir):
    run = tmp_path / "killed"
    common = [*RESUMABLE, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}"]
    killed = run_cli(*common, *signal_at(8, signal.SIGKILL))
    assert killed.returncode == -signal.SIGKILL and not (run / "results.json").exists()
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 5 and saved["PreferenceDataModule"]["batches_trained"] == 5
    resumed = run_cli(*common, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming epoch 0 after its first 5 batches" in resumed.stdout + resumed.stderr
    assert_same_run(uninterrupted, run)


def test_sigterm_saves_exits_cleanly_and_resumes(uninterrupted, tmp_path, cache_dir):
    run = tmp_path / "preempted"
    common = [*RESUMABLE, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}"]
    stopped = run_cli(*common, *signal_at(8, signal.SIGTERM))
    out = stopped.stdout + stopped.stderr
    assert stopped.returncode == 143 and "Traceback" not in out
    assert "stopped by SIGTERM; resume with ckpt_path=" in out
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 8
    resumed = run_cli(*common, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(uninterrupted, run)


def test_ckpt_path_last_starts_fresh_when_there_is_none(make_cfg):
    assert train(make_cfg("ckpt_path=last"))["global_step"] == 4


def test_a_kill_while_saving_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    writer = (
        "import time, torch\n"
        "from rewardlab.callbacks import AtomicCheckpointIO\n"
        "class Slow:\n"
        "    def __reduce__(self):\n"
        "        time.sleep(600)\n"
        "        return (int, ())\n"
        f"AtomicCheckpointIO().save_checkpoint({{'step': 2, 'w': torch.zeros(1000), 'slow': Slow()}}, {str(path)!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer])
    try:
        deadline = time.time() + 120
        while not list(tmp_path.glob(".last.ckpt.*.tmp")) and time.time() < deadline:
            time.sleep(0.05)
        assert list(tmp_path.glob(".last.ckpt.*.tmp")), "the writer never started"
    finally:
        proc.kill()
        proc.wait()
    assert torch.load(path, weights_only=True)["step"] == 1  # the previous checkpoint, whole
    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)
    assert not list(tmp_path.glob(".last.ckpt.*.tmp"))  # the next save clears what the killed one left


def test_trainer_slurm_requeues_and_resumes_from_the_run_folder(make_cfg, monkeypatch):
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    for key, value in {
        "SLURM_NTASKS": "1",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "rewardlab",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }.items():
        monkeypatch.setenv(key, value)
    overrides = ["trainer=slurm", "trainer.precision=32-true", "ckpt_path=last", "trainer.max_epochs=2"]
    cfg = make_cfg(*overrides, "+callbacks.stop._target_=tests.helpers.FailAtEpoch", "+callbacks.stop.epoch=1")
    trainer = build_trainer(cfg)
    env = trainer._accelerator_connector.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue and env.job_id() == 4242
    with pytest.raises(RuntimeError, match="preempted"):  # after epoch 0 and its last.ckpt
        train(cfg)
    assert train(make_cfg(*overrides))["global_step"] == 8  # the requeued job found last.ckpt, trained epoch 1
    assert train(make_cfg(*overrides))["global_step"] == 8  # requeued once more: finished, left as it is


# ------------------------------------------------------------------------------- non-finite loss


def nan_on_call(n: int):
    """Bradley–Terry's call, except call `n` (0-based) returns NaN: a poisoned batch, on cue."""
    calls, bradley_terry = iter(range(10**6)), losses.BradleyTerry.__call__

    def loss(self, chosen, rejected, margin):
        value = bradley_terry(self, chosen, rejected, margin)
        return value * float("nan") if next(calls) == n else value

    return loss


def test_a_nan_loss_stops_the_run_naming_step_and_rows(make_cfg, monkeypatch):
    monkeypatch.setattr(losses.BradleyTerry, "__call__", nan_on_call(2))
    with pytest.raises(FloatingPointError) as err:
        train(make_cfg())
    message = str(err.value)
    assert message.startswith("loss is nan at step 2 (epoch 0, batch 2), pairs from rows [")
    assert "quiz/train.jsonl (train split)" in message and "model.skip_nonfinite=true" in message


def test_skip_nonfinite_skips_and_counts_the_batch(make_cfg, monkeypatch):
    monkeypatch.setattr(losses.BradleyTerry, "__call__", nan_on_call(2))
    cfg = make_cfg("model.skip_nonfinite=true")
    results = train(cfg)
    assert results["train/skipped_nonfinite"] == 1 and results["global_step"] == 4  # counted, nothing applied
    weights = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_gradients_are_clipped_by_default(make_cfg, tmp_path):
    log = tmp_path / "norms.txt"
    record = ["+callbacks.norms._target_=tests.helpers.RecordGradNorms", f"+callbacks.norms.path={log}"]
    cfg = make_cfg(*record, "optimizer.lr=0.05")
    assert cfg.trainer.gradient_clip_val == 1.0
    train(cfg)
    clipped = [float(x) for x in log.read_text().split()]
    log.unlink()
    train(make_cfg(*record, "optimizer.lr=0.05", "trainer.gradient_clip_val=null", folder="unclipped"))
    unclipped = [float(x) for x in log.read_text().split()]
    assert max(clipped) <= 1.0 + 1e-4 < max(unclipped)


# ------------------------------------------------------------------------------------ distributed


def loss_per_step(run: Path) -> list[float]:
    import csv

    with open(next(run.glob("csv/version_*/metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss_step") and r.get("epoch")]  # not the results row
    return [float(r["train/loss_step"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


def test_ddp_on_two_processes_follows_the_single_process_trajectory(tmp_path, cache_dir):
    common = [
        "logger=csv",
        f"paths.cache_dir={cache_dir}",
        "trainer.max_steps=10",
        "trainer.log_every_n_steps=1",
        "trainer.limit_val_batches=2",
        "trainer.num_sanity_val_steps=0",
        "test=false",
        "data.batch_size=8",
        "~callbacks.progress_bar",
        "trainer.precision=32-true",  # the same math on 1 and 2 processes, compared to 1e-4
    ]
    single = run_cli(*common, f"hydra.run.dir={tmp_path / 'one'}")
    ddp = run_cli(*common, "trainer=ddp_cpu", f"hydra.run.dir={tmp_path / 'two'}")
    assert single.returncode == 0 and ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = loss_per_step(tmp_path / "one"), loss_per_step(tmp_path / "two")
    assert len(one) == len(two) == 10
    assert np.allclose(one, two, rtol=1e-4, atol=1e-5), (one, two)  # measured: 3e-7 at most
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())
    assert r2["val/loss"] == pytest.approx(r1["val/loss"], rel=1e-4) and r2["val/acc"] == r1["val/acc"]
    assert len(list((tmp_path / "two").rglob("results.json"))) == 1  # rank 0 alone writes results


# ---------------------------------------------------------------------------------------- secrets

SECRETS = {
    "WANDB_API_KEY": "wandb-secret-5a1f0c0ffee0123456789",
    "HF_TOKEN": "hf_secretTokenValue987654321",
    "MY_SERVICE_KEY": "k3y9",  # short, named *_KEY
    "DB_PASSWORD": "pw-77x",
    "SSH_PRIVATE": "private-material-42",
}
TYPED = {"+note2": "hf_typedOnTheCommandLine123456", "+db.password": "hunter2x"}  # secrets typed as overrides


def test_redact_replaces_secrets_from_the_environment(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-1234567890")
    monkeypatch.setenv("HOME_DIR_NAME", "tok-1234567890-not-secret-by-name")
    value = {"a": ["x tok-1234567890 y", 3], "b": "plain"}
    assert redact(value) == {"a": ["x *** y", 3], "b": "plain"}


def test_no_secret_reaches_the_run_folder(tmp_path, cache_dir):
    run = tmp_path / "run"
    done = run_cli(
        "logger=wandb",
        f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={run}",
        "+note=${oc.env:HF_TOKEN}",
        "+other=${oc.env:WANDB_API_KEY}",
        "+short=${oc.env:MY_SERVICE_KEY}",
        *(f"{k}={v}" for k, v in TYPED.items()),
        "trainer.max_steps=4",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "~callbacks.progress_bar",
        env=SECRETS,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    files = [p for p in run.rglob("*") if p.is_file()]
    assert len(files) > 10 and any(p.suffix == ".wandb" for p in files) and any(p.suffix == ".ckpt" for p in files)
    assert (run / ".hydra" / "overrides.yaml").exists()
    wandb_run = next(p for p in files if p.suffix == ".wandb").read_bytes()
    assert b"trainer.max_steps=4" in wandb_run and b"+db.password=***" in wandb_run  # the command line, masked
    for path in files:
        content = path.read_bytes()
        for name, secret in [*SECRETS.items(), *TYPED.items()]:
            assert secret.encode() not in content, f"{name} found in {path}"
    for name, secret in [*SECRETS.items(), *TYPED.items()]:
        assert secret not in done.stdout + done.stderr, f"{name} printed"
    ckpt = torch.load(next(run.glob("checkpoints/last.ckpt")), weights_only=True)
    assert ckpt["rewardlab_config"]["note"] == "***"


# ------------------------------------------------------------------------------------------- load


def processes_with(marker: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_thirty_job_multirun_finishes_every_job_and_leaks_nothing(tmp_path, cache_dir):
    sweep, fds = tmp_path / "sweep", tmp_path / "fds.txt"
    marker = uuid.uuid4().hex  # in the environment of every process the sweep starts
    done = run_cli(
        "-m",
        "seed=range(30)",
        "logger=wandb",
        f"paths.cache_dir={cache_dir}",
        f"hydra.sweep.dir={sweep}",
        "trainer.max_steps=3",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.num_sanity_val_steps=0",
        "~callbacks.progress_bar",
        "+callbacks.fds._target_=tests.helpers.RecordOpenFiles",
        f"+callbacks.fds.path={fds}",
        env={"RL_LOAD_TEST": marker},
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = sorted(sweep.glob("*/results.json"))
    assert len(results) == 30 and all(json.loads(p.read_text())["global_step"] == 3 for p in results)
    jobs = sorted(p.parent for p in results)
    assert [wandb_exit_code(job) for job in jobs] == [0] * 30  # every wandb run closed as finished
    counts = [int(x) for x in fds.read_text().split()]
    assert len(counts) == 30 and max(counts[2:]) <= counts[1] + 2  # no descriptors pile up from job to job
    time.sleep(2)
    assert processes_with(marker) == []  # no wandb service or loader worker outlives the sweep
