"""Settings are checked before anything is built: each mistake is one message naming its key."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewardlab.checks import ConfigError, check_types
from rewardlab.data.rows import DataError
from rewardlab.run import build

from .test_train import run_cli


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.max_length=abc", "data.max_length: expected int, got str 'abc'"),
        ("data.batch_size=1.5", "data.batch_size: expected int, got float 1.5"),
        ("data.group_by_length=maybe", "data.group_by_length: expected bool, got str 'maybe'"),
        ("data.columns.prompt=3", "data.columns.prompt: expected str, got int 3"),
        ("optimizer.lr=fast", "optimizer.lr: expected float or Tensor, got str 'fast'"),
        ("model.head_lr_mult=true", "model.head_lr_mult: expected float, got bool True"),
        ("trainer.max_epochs=many", "trainer.max_epochs: expected int or null, got str 'many'"),
        ("trainer.precision=17", "trainer.precision: expected one of"),
        ("backbone.num_layers=two", "backbone.num_layers: expected int, got str 'two'"),
        ("freeze=last_n", None),
    ],
)
def test_a_value_of_the_wrong_type_is_named_before_anything_is_built(override, message, make_cfg):
    cfg = make_cfg(override)
    if message is None:
        build(cfg)
        return
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        build(cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch_size=0", "data.batch_size=0: expected an integer >= 1"),
        ("data.eval_batch_size=-2", "data.eval_batch_size=-2: expected an integer >= 1"),
        ("data.group_batches=0", "data.group_batches=0: expected an integer >= 1"),
        ("data.eval_max_tokens=0", "data.eval_max_tokens=0: expected an integer >= 1"),
        ("data.truncation=cut", "data.truncation: unknown 'cut'; expected one of truncate, drop"),
        ("data.special_tokens_in_text=strip", "data.special_tokens_in_text: unknown 'strip'"),
    ],
)
def test_a_value_out_of_range_is_named_before_anything_is_built(override, message, make_cfg):
    with pytest.raises(DataError, match=message):
        build(make_cfg(override))


def test_max_length_beyond_the_backbones_positions_is_refused_before_training(make_cfg):
    with pytest.raises(ConfigError, match=r"data.max_length=600: the backbone reads at most 512 positions"):
        build(make_cfg("data.max_length=600"))


def test_max_length_too_small_for_any_response_is_refused_before_training(make_cfg):
    datamodule, _ = build(make_cfg("data.max_length=3"))
    with pytest.raises(DataError, match="data.max_length=3 leaves no room for a response"):
        datamodule.prepare_data()


WRONG = st.one_of(st.text(max_size=5), st.floats(allow_nan=False), st.booleans(), st.lists(st.integers(), max_size=2))


@settings(max_examples=60, deadline=None)
@given(
    key=st.sampled_from(["batch_size", "eval_batch_size", "max_length", "group_batches", "num_workers"]), value=WRONG
)
def test_any_non_integer_for_an_integer_setting_is_named(key, value):
    node = {"_target_": "rewardlab.data.module.PreferenceDataModule", key: value}
    with pytest.raises(ConfigError, match=f"^data.{key}: expected int"):
        check_types(node, "data")


def test_the_command_line_says_which_key_is_wrong_in_one_line(tmp_path):
    done = run_cli("data.max_length=abc", f"hydra.run.dir={tmp_path / 'run'}", "logger=none", timeout=120)
    assert done.returncode == 1 and "data.max_length: expected int, got str 'abc'" in done.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("resume.allow_changes=no", "resume.allow_changes: expected true or false, got str 'no'"),
        ("test=yes", "test: expected true or false, got str 'yes'"),
        ("seed=-1", r"seed: expected an integer in \[0, 2\^32\), got int -1"),
        ("seed=5000000000", r"seed: expected an integer in \[0, 2\^32\)"),
        ("optimizer.lr=-1", "optimizer.lr: expected a finite number > 0, got int -1"),
        ("optimizer.lr=nan", "optimizer.lr: expected a finite number > 0, got float nan"),
        ("optimizer.lr=inf", "optimizer.lr: expected a finite number > 0, got float inf"),
        ("optimizer.betas=[2.0,0.5]", r"optimizer.betas: expected numbers in \[0, 1\)"),
        ("optimizer.weight_decay=-5", "optimizer.weight_decay: expected a finite number >= 0"),
        ("model.head_lr_mult=-1", "model.head_lr_mult: expected a finite number > 0"),
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val: expected null or a finite number > 0"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches: expected an integer >= 1"),
        ("trainer.val_check_interval=0", r"trainer.val_check_interval: expected a fraction of an epoch in \(0, 1\]"),
        ("trainer.max_epochs=-2", "trainer.max_epochs: expected an integer >= -1"),
    ],
)
def test_a_value_that_cannot_work_is_refused_naming_the_key(override, message, make_cfg):
    with pytest.raises(ConfigError, match="^" + message):
        build(make_cfg(override))


def test_your_training_file_with_the_quizs_held_out_files_is_refused(make_cfg, tmp_path):
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(ConfigError, match="data.val_file and data.test_file still point at the embedded quiz"):
        build(make_cfg(f"data.train_file={mine}"))
    with pytest.raises(ConfigError, match="data.test_file still point"):
        build(make_cfg(f"data.train_file={mine}", f"data.val_file={mine}"))
    build(make_cfg(f"data.train_file={mine}", f"data.val_file={mine}", "data.test_file=null"))
    build(make_cfg(f"data.train_file={mine}", f"data.val_file={mine}", "test=false"))  # the test file is unused
