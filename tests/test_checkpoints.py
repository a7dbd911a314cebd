"""A checkpoint is data, never code: rebuilding a run builds only what rewardlab itself would build."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from rewardlab.checkpoints import UntrustedCheckpoint, checked_config, group_targets, known_targets, read_checkpoint
from rewardlab.errors import UserError
from rewardlab.run import build, load_run


@pytest.fixture(scope="module")
def stored(tmp_path_factory, cache_dir) -> dict:
    """A real run config and state dict, as `on_save_checkpoint` stores them."""
    from .conftest import compose_config

    cfg = compose_config("train", ["logger=none"], tmp_path_factory.mktemp("run"), cache_dir)
    _, model = build(cfg)
    config = OmegaConf.to_container(cfg.copy(), resolve=False)
    for group in ("optimizer", "model", "scheduler"):  # they read the backbone's recipe (lr, head_lr_mult, warmup)
        config[group] = OmegaConf.to_container(cfg[group], resolve=True)
    return {"rewardlab_config": config, "state_dict": model.state_dict()}


def save(tmp_path: Path, checkpoint: dict, **changes: dict) -> str:
    """The checkpoint as a run stores it (config resolved), with `changes` (group -> node) applied."""
    config = checkpoint["rewardlab_config"]
    for key in ("paths", "hydra"):  # resolved away as in a real checkpoint (run_config is resolved)
        config.pop(key, None)
    config["data"] = {k: v for k, v in config["data"].items() if "${" not in str(v)} | {
        "cache_dir": str(tmp_path / "c"),
        "report_dir": None,
        "seed": 1,
        "train_file": "t.jsonl",
        "val_file": "v.jsonl",
        "test_file": None,
    }
    config["model"]["feature_cache_dir"] = None
    config |= changes
    path = tmp_path / "x.ckpt"
    torch.save(checkpoint, path)
    return str(path)


def test_a_real_checkpoint_loads(stored, tmp_path):
    cfg, model, tokenizer = load_run(save(tmp_path, copy.deepcopy(stored)))
    assert not model.training and tokenizer.pad_token is not None and cfg.backbone.family == "llama"


def test_a_checkpoint_from_an_older_rewardlab_takes_todays_defaults_for_newer_keys_and_says_so(
    stored, tmp_path, caplog
):
    old = copy.deepcopy(stored)
    del old["rewardlab_config"]["model"]["share_prompt"], old["rewardlab_config"]["data"]["max_tokens_per_batch"]
    old["rewardlab_config"]["model"]["head_lr_mult"] = 3.0
    del old["rewardlab_config"]["head"]  # trained before heads were a config group: one linear head
    with caplog.at_level("WARNING"):
        cfg, model, _ = load_run(save(tmp_path, old))
    assert cfg.model.share_prompt == "auto" and cfg.data.max_tokens_per_batch is None
    assert cfg.model.head_lr_mult == 3.0  # what the checkpoint has stays
    assert cfg.head._target_ == "rewardlab.heads.LinearHead" and torch.equal(
        model.head.weight, stored["state_dict"]["head.weight"]
    )
    assert "head=linear, model.share_prompt=auto, data.max_tokens_per_batch=None taken from today's" in caplog.text


ATTACKS = {
    "builtins.open in the loss": ("loss", {"_target_": "builtins.open", "file": "PWNED", "mode": "a"}, "not one of"),
    "os.system in the optimizer": ("optimizer", {"_target_": "os.system", "command": "touch PWNED"}, "not one of"),
    "a logger that writes files, as the loss": (
        "loss", {"_target_": "rewardlab.loggers.wandb", "save_dir": "PWNED", "mode": "disabled"}, "not one of"
    ),
    "nested in an allowed group": (
        "loss", {"_target_": "rewardlab.losses.BradleyTerry", "x": {"_target_": "rewardlab.loggers.wandb"}}, "inside"
    ),
    "a list item": (
        "scheduler", {"_target_": "rewardlab.optim.warmup_schedule", "x": [{"_target_": "eval"}]}, "inside"
    ),
    "the data module": ("data", {"_target_": "subprocess.run", "args": ["touch", "PWNED"]}, "not one of"),
    "os.system as the head": (
        "head", {"_target_": "os.system", "_partial_": True, "command": "touch PWNED"}, "not one of"
    ),
    "positional arguments that turn on remote code": (
        "backbone",
        {"_target_": "rewardlab.backbones.pretrained", "_args_": ["PWNED", "float32", None, True]},
        "not a config key",
    ),
    "positional arguments that write elsewhere": (
        "backbone", {"_target_": "rewardlab.backbones.smollm2_135m", "_args_": ["PWNED"]}, "not a config key"
    ),
    "an escaped interpolation": ("data", {"_target_": "rewardlab.data.module.PreferenceDataModule",
                                          "chat_template": "\\${oc.env:HOME}"}, "interpolation"),
}  # fmt: skip


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_what_rewardlab_would_not_build_is_refused_naming_the_key_and_nothing_runs(
    attack, stored, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    group, node, why = ATTACKS[attack]
    path = save(tmp_path, copy.deepcopy(stored), **{group: node})
    with pytest.raises(UntrustedCheckpoint, match=rf"key '{group}[^']*' .*{why}.*nothing was built"):
        load_run(path)
    assert not (tmp_path / "PWNED").exists()


def test_a_target_of_your_own_runs_only_when_this_command_allows_it(stored, tmp_path):
    loss = {"_target_": "tests.test_checkpoints.my_loss", "_partial_": True}
    path = save(tmp_path, copy.deepcopy(stored), loss=loss)
    with pytest.raises(UntrustedCheckpoint, match="tests.test_checkpoints.my_loss"):
        load_run(path)
    _, model, _ = load_run(path, allow_targets=["tests.test_checkpoints.my_loss"])
    assert model.loss_fn.func is my_loss


def my_loss(chosen, rejected, margin):  # a user's own loss, allowed by name on the command line
    return (rejected - chosen).mean()


def test_trust_remote_code_stays_off_unless_this_command_turns_it_on(stored, tmp_path, monkeypatch, caplog):
    seen = []
    monkeypatch.setattr("rewardlab.backbones.AutoTokenizer.from_pretrained", lambda *a, **k: seen.append(k) or 1 / 0)
    backbone = {"_target_": "rewardlab.backbones.pretrained", "name_or_path": "evil/model", "trust_remote_code": True}
    path = save(tmp_path, copy.deepcopy(stored), backbone=backbone)
    with pytest.raises(Exception, match="ZeroDivisionError"):
        load_run(path)
    assert seen[-1]["trust_remote_code"] is False
    assert "backbone.trust_remote_code' is True in the checkpoint" in caplog.text
    with pytest.raises(Exception, match="ZeroDivisionError"):
        load_run(path, trust_remote_code=True)
    assert seen[-1]["trust_remote_code"] is True


def test_interpolations_in_a_checkpoint_are_refused(stored, tmp_path, monkeypatch):
    monkeypatch.setenv("RL_TEST_SECRET", "leaked")
    path = save(tmp_path, copy.deepcopy(stored))
    checkpoint = torch.load(path, weights_only=True)
    for text in ("${oc.env:RL_TEST_SECRET}", "\\${oc.env:RL_TEST_SECRET}", "a ${x} b"):
        checkpoint["rewardlab_config"]["data"]["chat_template"] = text
        torch.save(checkpoint, path)
        with pytest.raises(UntrustedCheckpoint, match="key 'data.chat_template' holds '\\$\\{', an interpolation"):
            load_run(path)


@pytest.mark.parametrize(
    "config",
    [None, "text", [], {"backbone": {}}, {"backbone": 3, "model": {}, "loss": {}}],
)
def test_a_checkpoint_without_a_run_config_is_refused(config, stored, tmp_path):
    path = tmp_path / "x.ckpt"
    torch.save({"rewardlab_config": config, "state_dict": stored["state_dict"]}, path)
    with pytest.raises(UntrustedCheckpoint, match="not a rewardlab run config"):
        load_run(str(path))


def test_a_pickle_that_runs_code_never_loads(tmp_path):
    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "PWNED",))

    path = tmp_path / "evil.ckpt"
    torch.save({"rewardlab_config": Evil(), "state_dict": {}}, path)
    with pytest.raises(UntrustedCheckpoint, match="not a rewardlab checkpoint: not a file of tensors") as caught:
        load_run(str(path))
    assert "weights_only" not in str(caught.value)  # never torch's advice to unpickle it
    assert not (tmp_path / "PWNED").exists()


def test_what_is_not_a_checkpoint_is_named_not_a_traceback(stored, tmp_path):
    (tmp_path / "text.ckpt").write_text("hello")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    torch.save([1, 2], tmp_path / "list.ckpt")
    torch.save({"rewardlab_config": stored["rewardlab_config"], "state_dict": [1]}, tmp_path / "state.ckpt")
    for name, why in [
        ("text.ckpt", "not a checkpoint \\(torch cannot read it"),
        ("empty.ckpt", "not a checkpoint \\(torch cannot read it"),
        ("list.ckpt", "holds a list, not a checkpoint"),
        ("state.ckpt", "'state_dict' is not a mapping of tensors"),
    ]:
        with pytest.raises(UntrustedCheckpoint, match=f"{name}: .*{why}"):
            load_run(str(tmp_path / name))


def test_a_compressed_checkpoint_that_would_unpack_into_much_more_memory_is_refused(tmp_path):
    import zipfile

    torch.save({"state_dict": {"w": torch.zeros(1000, 1000)}}, tmp_path / "plain.ckpt")
    with zipfile.ZipFile(tmp_path / "plain.ckpt") as src, zipfile.ZipFile(tmp_path / "bomb.ckpt", "w") as dst:
        for member in src.infolist():
            dst.writestr(member.filename, src.read(member), compress_type=zipfile.ZIP_DEFLATED)
    assert (tmp_path / "bomb.ckpt").stat().st_size < 100_000 < (tmp_path / "plain.ckpt").stat().st_size
    with pytest.raises(UntrustedCheckpoint, match="compressed members"):
        read_checkpoint(tmp_path / "bomb.ckpt")
    assert read_checkpoint(tmp_path / "plain.ckpt")["state_dict"]["w"].shape == (1000, 1000)


@pytest.mark.parametrize(
    "head, says",
    [
        ({"_target_": "rewardlab.heads.EnsembleHead", "_partial_": True, "k": "4", "bootstrap": True, "seed": 1},
         "head.k: expected int, got str '4'"),
        ({"_target_": "rewardlab.heads.EnsembleHead", "_partial_": True, "k": 10**9, "bootstrap": True, "seed": 1},
         "head.k: expected an integer in [2, 1024]"),
        ({"_target_": "rewardlab.heads.OdinHead", "_partial_": True, "length_coef": 1.0, "ortho_coef": 1.0},
         "'head.weight' has shape (1, {h}), but the model its config describes (head rewardlab.heads.OdinHead) has "
         "(2, {h})"),
        ({}, "its head config is not a head option rewardlab writes"),
        ({"_target_": "rewardlab.heads.LinearHead", "_partial_": False}, "its head config is not a head option"),
    ],
)  # fmt: skip
def test_a_stored_head_is_checked_like_a_setting_and_against_the_weights(head, says, stored, tmp_path):
    path = save(tmp_path, copy.deepcopy(stored), head=head)
    says = says.format(h=stored["state_dict"]["head.weight"].shape[1])
    with pytest.raises(UserError, match=re.escape(says)):
        load_run(path)


def test_weights_the_model_needs_but_the_checkpoint_lacks_are_named(stored, tmp_path):
    checkpoint = copy.deepcopy(stored)
    del checkpoint["state_dict"]["head.weight"]
    with pytest.raises(UntrustedCheckpoint, match="its weights lack 'head.weight'"):
        load_run(save(tmp_path, checkpoint))


def test_known_targets_are_what_the_packaged_configs_name():
    targets = known_targets()
    assert "rewardlab.model.RewardModel" in targets and "torch.optim.AdamW" in targets
    assert {"rewardlab.heads.LinearHead", "rewardlab.heads.EnsembleHead", "rewardlab.heads.OdinHead"} <= targets
    assert not any(t.startswith(("builtins", "os.", "subprocess")) for t in targets)


KEY = st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=8)
VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEY | st.just("_target_"), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=80, deadline=None)
@given(extra=st.dictionaries(KEY, VALUE, max_size=3))
def test_any_target_or_interpolation_below_a_group_is_refused(extra):
    """Property: whatever the nesting, a `_target_` below a group's top, or an interpolation, is found
    before anything is built; anything else passes."""
    config = {g: {"_target_": next(iter(targets))} for g, targets in group_targets().items()}
    config["data"]["extra"] = extra
    if _targets(extra) or "${" in json.dumps(extra):
        with pytest.raises(UntrustedCheckpoint, match="nothing was built"):
            checked_config(config, "x.ckpt", (), False)
    else:
        assert checked_config(config, "x.ckpt", (), False).data.extra == extra


def _targets(node) -> list:
    if isinstance(node, dict):
        return (["x"] if "_target_" in node else []) + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []
