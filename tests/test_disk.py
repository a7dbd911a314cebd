"""Checkpoints need room: a disk that cannot hold them is named before the first checkpoint is written,
and a disk that fills up during a save fails that save in one line and keeps the previous checkpoint."""

from __future__ import annotations

import logging
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from rewardlab import callbacks
from rewardlab.callbacks import AtomicCheckpointIO, DiskSpace, DiskSpaceError, checkpoint_bytes, size_text
from rewardlab.train import train

Usage = namedtuple("Usage", "total used free")


def disk_with(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    monkeypatch.setattr(callbacks.shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - free, free))


def test_sizes_read_as_people_count_them():
    assert [size_text(n) for n in (0, 999, 1000, 1_620_000_000, 3.4e12)] == [
        "0 B",
        "999 B",
        "1 kB",
        "1.62 GB",
        "3.4e+03 GB",
    ]


def test_shared_storage_counts_once():
    weight = torch.zeros(1000)
    module = torch.nn.Module()
    module.register_buffer("a", weight)
    module.register_buffer("b", weight[:10])  # a view: torch.save writes the storage once
    assert checkpoint_bytes(module, []) == 4000


@pytest.mark.parametrize(
    ("free", "refused", "warned"),
    [(99, True, False), (100, False, True), (299, False, True), (300, False, False)],
)
def test_room_for_one_checkpoint_or_all_it_keeps(monkeypatch, caplog, tmp_path, free, refused, warned):
    """One checkpoint of 100 bytes, two kept and a third written beside them: 300 bytes at the peak."""
    disk_with(monkeypatch, free)
    with caplog.at_level(logging.WARNING, logger="rewardlab.callbacks"):
        problem = DiskSpace(str(tmp_path / "not" / "yet")).check(size=100, kept=2)
    assert (problem is not None) == refused
    assert ("may run out of room" in caplog.text) == warned
    if refused:
        assert str(tmp_path / "not" / "yet") in problem and "100 B" in problem and "99 B free" in problem


def test_a_disk_that_cannot_hold_one_checkpoint_stops_the_run_before_any_is_written(make_cfg, monkeypatch):
    """The size checked after the first step is the size of the checkpoint a full run writes."""
    done = train(cfg := make_cfg("trainer.max_steps=2", folder="full"))
    written = (Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").stat().st_size
    weights, moments = 4 * done["params/total"], 2 * 4 * done["params/trainable"]  # fp32 weights, AdamW's two
    checked = []
    monkeypatch.setattr(DiskSpace, "check", lambda self, size, kept: checked.append((size, kept)) or "no room")
    with pytest.raises(DiskSpaceError, match="no room"):
        train(cfg := make_cfg("trainer.max_steps=2", folder="refused"))
    assert not list((Path(cfg.paths.output_dir) / "checkpoints").glob("*.ckpt"))
    [(size, kept)] = checked
    assert kept == 2  # best and last
    assert weights + moments <= size <= written <= 1.05 * size + 200_000, (weights + moments, size, written)


def test_without_checkpoints_nothing_is_checked(make_cfg, monkeypatch):
    monkeypatch.setattr(DiskSpace, "check", lambda self, size, kept: pytest.fail("checked"))
    cfg = make_cfg("~callbacks.model_checkpoint", "~callbacks.last_checkpoint", "+trainer.enable_checkpointing=false")
    assert train(cfg)["global_step"] == 4


def test_a_full_disk_fails_the_save_in_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)

    def short_write(obj, f):  # what torch raised when CI's disk filled mid-save
        f.write(b"x" * 5000)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 952307072 vs 952306960")

    monkeypatch.setattr(callbacks.torch, "save", short_write)
    disk_with(monkeypatch, 4096)
    with pytest.raises(DiskSpaceError) as error:
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    assert str(path) in str(error.value)
    assert "out of disk space or quota (4.1 kB free on its disk after 5 kB of it was written)" in str(error.value)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert not list(tmp_path.glob(".last.ckpt.*.tmp"))


def test_a_failed_save_on_a_disk_with_room_keeps_its_own_error(tmp_path, monkeypatch):
    def broken(obj, f):
        raise RuntimeError("unexpected pos 10 vs 5")

    monkeypatch.setattr(callbacks.torch, "save", broken)
    disk_with(monkeypatch, 10**9)
    with pytest.raises(RuntimeError, match="unexpected pos") as error:
        AtomicCheckpointIO().save_checkpoint({"step": 2}, tmp_path / "last.ckpt")
    assert not isinstance(error.value, DiskSpaceError)
    assert list(tmp_path.iterdir()) == []


def test_no_space_left_says_so_whatever_the_free_count(tmp_path, monkeypatch):
    """A quota (EDQUOT) or a full disk (ENOSPC) names itself even where the disk reports room."""

    def no_space(obj, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(callbacks.torch, "save", no_space)
    with pytest.raises(DiskSpaceError, match="out of disk space or quota"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, tmp_path / "last.ckpt")
    assert shutil.disk_usage(tmp_path).free > 0
