"""Checkpoints need room: a disk that cannot hold them is named before the first checkpoint is written,
and a disk that fills up during a save fails that save in one line and keeps the earlier checkpoints."""

from __future__ import annotations

import errno
import logging
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy

from rewardlab import callbacks, disk
from rewardlab.callbacks import AtomicCheckpointIO
from rewardlab.disk import DiskSpace, DiskSpaceError, Folder, check, checkpoint_bytes, planned, size_text
from rewardlab.train import train

Usage = namedtuple("Usage", "total used free")


def disk_with(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: Usage(10**15, 10**15 - free, free))


def test_sizes_read_as_people_count_them():
    sizes = (0, 999, 999.6, 1000, 999_999, 1_620_000_000, 3.4e12, 2e15)
    assert [size_text(n) for n in sizes] == ["0 B", "999 B", "1 kB", "1 kB", "1 MB", "1.62 GB", "3.4 TB", "2e+03 TB"]


def test_shared_storage_counts_once():
    weight = torch.zeros(1000)
    module = torch.nn.Module()
    module.register_buffer("a", weight)
    module.register_buffer("b", weight[:10])  # a view: torch.save writes the storage once
    assert checkpoint_bytes(module, []) == (4000, 4000)


def test_a_folder_keeps_its_top_k_and_one_last(tmp_path):
    """The packaged pair (best + last, and last every N steps into the same folder) keeps two files; a
    weights-only best beside a full last is as large as the full one; "link" costs no file."""

    def saver(folder: str = "a", **kwargs) -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=tmp_path / folder, monitor="val/acc", **kwargs)

    def kept(*savers: ModelCheckpoint) -> list[tuple[str, int, int, bool]]:
        return [(f.path.name, f.size, f.kept, f.unbounded) for f in planned(list(savers), weights=10, full=30)]

    packaged = saver(save_top_k=1, save_last=True), saver(save_top_k=0, save_last=True)
    assert kept(*packaged) == [("a", 30, 2, False)]
    assert kept(saver(save_top_k=1, save_last=True, save_weights_only=True)) == [("a", 10, 2, False)]
    assert kept(saver(save_top_k=1, save_weights_only=True), packaged[1]) == [("a", 30, 2, False)]
    assert kept(saver(save_top_k=3, save_last="link")) == [("a", 30, 3, False)]
    assert kept(saver(save_top_k=0, save_last="link")) == [("a", 30, 1, False)]
    assert kept(saver(save_top_k=-1, save_last=True)) == [("a", 30, 2, True)]  # at least one best, and last
    assert kept(saver(save_top_k=-1)) == [("a", 30, 1, True)]
    assert kept(saver(save_top_k=0, save_last=False)) == []
    assert kept(saver(save_top_k=1), saver("b", save_top_k=2, save_weights_only=True)) == [
        ("a", 30, 1, False),
        ("b", 10, 2, False),
    ]


@pytest.mark.parametrize(
    ("free", "present", "refused", "warned"),
    [(99, 0, True, False), (100, 0, False, True), (299, 0, False, True), (300, 0, False, False)]
    + [(149, 150, False, True), (150, 150, False, False), (100, 10**6, False, False), (99, 10**6, True, False)],
)
def test_room_for_one_checkpoint_or_all_it_keeps(monkeypatch, caplog, tmp_path, free, present, refused, warned):
    """One checkpoint of 100 bytes, two kept and a third written beside them: 300 bytes at the peak, less
    the checkpoints a resumed run finds in its folder (it replaces them), but never less than one."""
    disk_with(monkeypatch, free)
    folder = tmp_path / "not" / "yet"
    with caplog.at_level(logging.WARNING, logger="rewardlab.disk"):
        problem = check([Folder(folder, size=100, kept=2, present=present)])
    assert (problem is not None) == refused
    assert ("may run out of room" in caplog.text) == warned
    if refused:
        assert f"checkpoints: {folder}: one checkpoint of this run is 100 B, and its disk has 99 B free" in problem
    if warned:
        assert "the run keeps 2 checkpoints at once and writes the next beside them: 300 B" in caplog.text
        assert ("less 150 B of them already there" in caplog.text) == (present == 150)


def test_a_resumed_run_counts_the_checkpoints_in_its_folder_that_it_replaces(tmp_path):
    """Not the best.ckpt link (nor its copy where links are not allowed), not other files, and none where
    save_top_k=-1 keeps every checkpoint."""
    (folder := tmp_path / "checkpoints").mkdir()
    (folder / "last.ckpt").write_bytes(b"x" * 150)
    (folder / "best-step4.ckpt").write_bytes(b"x" * 100)
    (folder / "best.ckpt").symlink_to("best-step4.ckpt")
    (folder / "notes.txt").write_bytes(b"x" * 1000)
    [resumed] = planned([ModelCheckpoint(dirpath=folder, save_last=True)], weights=10, full=30)
    assert resumed.present == 250
    [keeps_all] = planned([ModelCheckpoint(dirpath=folder, save_top_k=-1)], weights=10, full=30)
    assert keeps_all.present == 0


def test_the_fixes_offered_are_those_the_settings_do_not_already_apply(monkeypatch, caplog, tmp_path):
    def offered(free: int, **settings) -> str:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="rewardlab.disk"):
            problem = check([Folder(tmp_path, size=100, kept=2, **settings)])
        return problem or caplog.text

    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: Usage(10**15, 0, free))
    free = 50
    assert "save_weights_only=true callbacks.last_checkpoint=null" in offered(free, full=True)
    refused = offered(free, full=False, last=True, top=3)
    assert "free space, or write the run to another disk" in refused
    assert "save_weights_only" not in refused and "save_top_k" not in refused and "save_last" not in refused
    free = 250
    warned = offered(free, full=True, last=True, top=3)
    assert "save_weights_only" in warned and "save_top_k=1" in warned and "save_last=false" in warned
    warned = offered(free, full=False, top=1)
    assert "save_weights_only" not in warned and "save_top_k" not in warned and "save_last" not in warned
    assert "(and every best one" not in warned and "(and every best one" in offered(free, top=-1, unbounded=True)


def run_folder(cfg) -> Path:
    return Path(cfg.paths.output_dir) / "checkpoints"


def test_a_disk_that_cannot_hold_one_checkpoint_stops_the_run_before_any_is_written(make_cfg, monkeypatch):
    """The sizes checked after the first step are the sizes of the checkpoints a full run writes."""
    done = train(cfg := make_cfg("trainer.max_steps=2", folder="full"))
    written = (run_folder(cfg) / "last.ckpt").stat().st_size
    weights, moments = 4 * done["params/total"], 2 * 4 * done["params/trainable"]  # fp32 weights, AdamW's two
    checked = []
    monkeypatch.setattr(disk, "check", lambda folders: checked.append(folders) or "no room")
    with pytest.raises(DiskSpaceError, match="no room"):
        train(cfg := make_cfg("trainer.max_steps=2", folder="refused"))
    assert not list(run_folder(cfg).glob("*.ckpt"))
    [[folder]] = checked
    assert folder.path == run_folder(cfg) and folder.kept == 2  # best and last
    assert weights + moments <= folder.size <= written <= 1.05 * folder.size + 200_000, (folder, written)

    weights_only = ("callbacks.model_checkpoint.save_weights_only=true", "callbacks.model_checkpoint.save_last=false")
    monkeypatch.undo()
    train(cfg := make_cfg("trainer.max_steps=2", *weights_only, "~callbacks.last_checkpoint", folder="weights"))
    [best] = run_folder(cfg).glob("best-*.ckpt")
    monkeypatch.setattr(disk, "check", lambda folders: checked.append(folders) or "no room")
    with pytest.raises(DiskSpaceError):
        train(make_cfg("trainer.max_steps=2", *weights_only, "~callbacks.last_checkpoint", folder="weights2"))
    [folder] = checked[-1]
    assert folder.kept == 1 and weights <= folder.size <= best.stat().st_size <= 1.05 * folder.size + 200_000


def test_without_checkpoints_nothing_is_checked(make_cfg, monkeypatch):
    monkeypatch.setattr(disk, "check", lambda folders: pytest.fail("checked"))
    cfg = make_cfg("~callbacks.model_checkpoint", "~callbacks.last_checkpoint", "+trainer.enable_checkpointing=false")
    assert train(cfg)["global_step"] == 4


def fake_trainer(strategy, tmp_path: Path) -> SimpleNamespace:
    module = torch.nn.Linear(2, 1)
    return SimpleNamespace(
        global_step=1,
        strategy=strategy,
        is_global_zero=True,
        optimizers=[torch.optim.AdamW(module.parameters())],
        checkpoint_callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        module=module,
    )


@pytest.mark.parametrize("strategy", [DeepSpeedStrategy, FSDPStrategy])
def test_sharded_strategies_are_not_checked(monkeypatch, caplog, tmp_path, strategy):
    """One rank cannot size a sharded checkpoint without the others (it would wait for them forever)."""
    monkeypatch.setattr(disk, "checkpoint_bytes", lambda *args: pytest.fail("sized"))
    trainer = fake_trainer(object.__new__(strategy), tmp_path)
    with caplog.at_level(logging.INFO, logger="rewardlab.disk"):
        DiskSpace().on_train_batch_end(trainer, trainer.module, None, {}, 0)
    assert f"not checked under {strategy.__name__}" in caplog.text


def test_a_check_that_fails_warns_and_the_run_goes_on(monkeypatch, caplog, tmp_path):
    def broken(*args):
        raise KeyError("state")

    broadcast = []
    strategy = object.__new__(SingleDeviceStrategy)
    monkeypatch.setattr(strategy, "broadcast", lambda obj, src: broadcast.append(obj) or obj, raising=False)
    monkeypatch.setattr(disk, "checkpoint_bytes", broken)
    trainer = fake_trainer(strategy, tmp_path)
    with caplog.at_level(logging.WARNING, logger="rewardlab.disk"):
        DiskSpace().on_train_batch_end(trainer, trainer.module, None, {}, 0)
    assert "disk space not checked: KeyError: 'state'" in caplog.text
    assert broadcast == [None]  # the other ranks hear there is no problem


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
    message = str(error.value)
    assert message.startswith(f"could not write checkpoint {path}: RuntimeError: [enforce fail")
    assert "(4.1 kB free on its disk after 5 kB of it was written: likely out of disk space or quota)" in message
    assert "earlier checkpoints are intact; free space, or write the run to another disk" in message
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


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("wrapped", [False, True])
def test_no_space_or_quota_says_so_whatever_the_free_count(tmp_path, monkeypatch, code, wrapped):
    """A quota or a full disk names itself where the disk reports room, also where torch's writer caught
    the OSError and raised its own RuntimeError in its handler."""

    def no_space(obj, f):
        try:
            raise OSError(code, "Disk quota exceeded")
        except OSError:
            if wrapped:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")  # noqa: B904
            raise

    monkeypatch.setattr(callbacks.torch, "save", no_space)
    disk_with(monkeypatch, 10**9)
    with pytest.raises(DiskSpaceError, match=r"out of disk space or quota \(1 GB free .*; (RuntimeError|OSError): "):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, tmp_path / "last.ckpt")


def test_another_error_on_a_full_disk_is_named_beside_it(tmp_path, monkeypatch):
    def denied(obj, f):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(callbacks.torch, "save", denied)
    disk_with(monkeypatch, 0)
    with pytest.raises(DiskSpaceError, match=r"PermissionError: \[Errno 13\] Permission denied \(0 B free .*: likely"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, tmp_path / "last.ckpt")
