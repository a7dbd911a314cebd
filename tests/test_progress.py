"""Runs a user can follow from a log file: plain progress lines off a terminal, a line per validation,
a one-line summary, checkpoints/best.ckpt, named learning-rate groups, and clear one-line refusals
(a checkpoint folder, a file that is no checkpoint, columns that do not match, an unreachable hub)."""

from __future__ import annotations

import csv
import json
import re

import pytest
from lightning.pytorch.callbacks import RichProgressBar

from rewardlab import backbones
from rewardlab.checkpoints import restore_run_state
from rewardlab.errors import UserError
from rewardlab.progress import PlainProgress, duration, progress_bar

from .test_train import run_cli


def test_the_bar_is_rich_in_a_terminal_and_plain_lines_elsewhere(monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert isinstance(progress_bar("auto", 30), RichProgressBar)
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    assert isinstance(progress_bar("auto", 30), PlainProgress)
    assert isinstance(progress_bar("rich", 30), RichProgressBar) and isinstance(progress_bar("plain", 5), PlainProgress)
    with pytest.raises(ValueError, match="style: expected auto, rich or plain, got 'tqdm'"):
        progress_bar("tqdm", 30)
    with pytest.raises(ValueError, match="interval_s: expected seconds > 0"):
        progress_bar("plain", 0)
    assert [duration(s) for s in (7.9, 185, 7620)] == ["7s", "3m05s", "2h07m"]


def test_a_run_off_a_terminal_logs_plain_lines_a_summary_and_links_the_best(tmp_path, cache_dir):
    run = tmp_path / "run"
    done = run_cli("logger=csv", "trainer.max_steps=24", "trainer.val_check_interval=12",
                   "trainer.num_sanity_val_steps=0", "callbacks.progress_bar.interval_s=0.001",
                   "trainer.enable_model_summary=false",
                   f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    log = (run / "train.log").read_text()
    steps = re.findall(r"step (\d+)/24 epoch 0: loss \d\.\d{4} acc \d\.\d{3}, [\d.]+ pairs/s, \S+ left", log)
    assert [int(s) for s in steps] == list(range(1, 25))  # every step, since the interval is tiny
    validations = re.findall(r"validation at step (\d+) \(epoch 0\): val/acc (\S+), val/acc_best (\S+), val/loss", log)
    assert [v[0] for v in validations] == ["12", "24"]
    assert float(validations[1][2]) == max(float(validations[0][1]), float(validations[1][1]))
    results = json.loads((run / "results.json").read_text())
    best = run / "checkpoints" / "best.ckpt"
    assert results["best_checkpoint"] == str(best) and best.is_symlink() and best.resolve().name.startswith("best-step")
    summary = [line for line in log.splitlines() if " - done in " in line]
    assert len(summary) == 1 and f"val/acc_best {results['val/acc_best']:.4f}" in summary[0]
    assert f"test/acc {results['test/acc']:.4f}; best checkpoint {best}; results {run / 'results.json'}" in summary[0]
    assert log.index(" - done in ") > log.index("validation at step 24")
    header = next(csv.reader(open(next(run.rglob("metrics.csv")))))
    assert {"lr/backbone", "lr/backbone_no_decay", "lr/head"} <= set(header)  # named learning-rate groups
    output = done.stdout + done.stderr
    for noise in ("was configured so", "💡 Tip", "LeafSpec", "Loading `train_dataloader`"):
        assert noise not in output, noise

    folder = run_cli("ckpt_path=" + str(run / "checkpoints"), module="rewardlab.eval")
    assert (
        folder.returncode == 1
        and f"ckpt_path={run / 'checkpoints'} is a folder, expected a checkpoint file" in folder.stderr
    )
    assert "best.ckpt" in folder.stderr and "last.ckpt" in folder.stderr
    again = run_cli(f"ckpt_path={run / 'checkpoints'}", "logger=none", f"hydra.run.dir={tmp_path / 'r2'}")
    assert again.returncode == 1 and "is a folder, expected a checkpoint file; it holds " in again.stderr


@pytest.mark.parametrize("content", [b"hello\n", b"\x80\x04\x95" + b"\x00" * 20])
def test_a_file_that_is_no_checkpoint_says_so_without_torchs_advice(tmp_path, content):
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    done = run_cli(f"ckpt_path={path}", module="rewardlab.eval")
    assert done.returncode == 1 and done.stderr.startswith(f"error: {path}: not a")
    assert "weights_only" not in done.stderr and "Traceback" not in done.stderr


def test_a_pickle_naming_code_is_refused_as_not_a_rewardlab_checkpoint(tmp_path):
    import collections
    import pickle

    path = tmp_path / "model.ckpt"
    path.write_bytes(pickle.dumps(collections.OrderedDict(a=print)))
    done = run_cli(f"ckpt_path={path}", module="rewardlab.eval")
    assert done.returncode == 1 and "not a file of tensors and plain values only" in done.stderr
    assert "weights_only" not in done.stderr


def test_rows_without_the_expected_columns_name_theirs_and_the_keys_to_map(tmp_path, cache_dir):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"question": "q", "good": "a", "bad": "b"}\n' * 3)
    done = run_cli(f"data.train_file={data}", f"data.val_file={data}", "data.test_file=null", "logger=none",
                   f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    assert done.returncode == 1
    assert f"{data}:1: field 'prompt': missing field 'prompt'" in done.stderr
    assert "this row's fields are 'question', 'good', 'bad': map yours with data.columns.prompt=<your column> " \
           "data.columns.chosen=<your column> data.columns.rejected=<your column>" in done.stderr  # fmt: skip


def test_an_unreachable_hub_fails_in_seconds_naming_the_local_options(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(backbones, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(UserError, match=r"backbone.name_or_path=someone/some-model: could not reach the hub .*"
                                        r"backbone=minilm or backbone=smollm2_135m.*HF_HUB_OFFLINE=1"):  # fmt: skip
        backbones.pretrained("someone/some-model")
    assert backbones.local_files_only([str(tmp_path), None], None) is False  # local folders never ask the hub


def test_the_probe_gives_up_on_a_connection_that_hangs(monkeypatch):
    import socket
    import time

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: time.sleep(30))  # a lookup that never returns
    started = time.perf_counter()
    assert backbones.hub_reachable(timeout=0.5) is False
    assert time.perf_counter() - started < 2


def test_the_probe_reads_the_endpoint(monkeypatch):
    import socket

    seen = []
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: seen.append(address) or socket.socket())
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example:8080")
    assert backbones.hub_reachable() is True and seen == [("mirror.example", 8080)]


def test_offline_mode_is_one_line_too(tmp_path):
    done = run_cli("backbone=hf", "backbone.name_or_path=someone/some-model", "logger=none",
                   f"hydra.run.dir={tmp_path / 'run'}", env={"HF_HUB_OFFLINE": "1"})  # fmt: skip
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and last.startswith("error: backbone.name_or_path=someone/some-model: ")
    assert "Traceback" not in done.stderr


def test_behind_a_proxy_transformers_decides(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setattr(backbones, "hub_reachable", lambda timeout=3.0: pytest.fail("probed past a proxy"))
    assert backbones.local_files_only(["someone/some-model"], None) is False


def test_a_link_to_a_checkpoint_that_is_gone_says_so(tmp_path):
    from rewardlab.checkpoints import checkpoint_file

    (tmp_path / "best.ckpt").symlink_to("best-step10-acc0.9.ckpt")
    with pytest.raises(FileNotFoundError, match="links to 'best-step10-acc0.9.ckpt', which no longer exists"):
        checkpoint_file(tmp_path / "best.ckpt")


def test_optimizer_states_saved_before_groups_had_names_get_them():
    from .conftest import reward_model

    model = reward_model(backbones.tiny("llama", 32, 1, 2, 64, 128, 0.0).model)
    saved = {"optimizer_states": [{"param_groups": [{"lr": 1e-3}, {"lr": 1e-3}, {"lr": 1e-3}], "state": {}}]}
    model.on_load_checkpoint(saved)
    assert [g["name"] for g in saved["optimizer_states"][0]["param_groups"]] == [
        "backbone",
        "backbone_no_decay",
        "head",
    ]
    other = {"optimizer_states": [{"param_groups": [{"name": "head"}], "state": {}}]}  # trained with another freezing
    with pytest.raises(UserError, match="holds the parameter groups head; this run trains backbone, backbone_no_dec"):
        restore_run_state(other, True, ["backbone", "backbone_no_decay", "head"])
    restore_run_state(other, False, ["backbone", "backbone_no_decay", "head"])  # eval and export read no optimizer
