"""A checkpoint is data, never code: rebuilding a run builds only rewardlab's own targets."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from rewardlab.run import UntrustedCheckpoint, build, known_targets, load_run


@pytest.fixture(scope="module")
def stored(tmp_path_factory, cache_dir) -> dict:
    """A real run config and state dict, as `on_save_checkpoint` stores them."""
    from .conftest import compose_config

    cfg = compose_config("train", ["logger=none"], tmp_path_factory.mktemp("run"), cache_dir)
    _, model = build(cfg)
    return {"rewardlab_config": OmegaConf.to_container(cfg.copy(), resolve=False), "state_dict": model.state_dict()}


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


ATTACKS = {
    "builtins.open in the loss": ("loss", {"_target_": "builtins.open", "file": "PWNED", "mode": "a"}),
    "os.system in the optimizer": ("optimizer", {"_target_": "os.system", "command": "touch PWNED"}),
    "nested in a partial": ("freeze", {"_target_": "rewardlab.freeze.full", "x": {"_target_": "posix.system"}}),
    "a list item": ("scheduler", {"_target_": "rewardlab.optim.warmup_schedule", "x": [{"_target_": "eval"}]}),
    "the data module": ("data", {"_target_": "subprocess.run", "args": ["touch", "PWNED"]}),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_foreign_target_is_refused_naming_key_and_target_and_nothing_runs(attack, stored, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    group, node = ATTACKS[attack]
    path = save(tmp_path, copy.deepcopy(stored), **{group: node})
    with pytest.raises(UntrustedCheckpoint, match=r"key '" + group + r"[.\[\]\w]*\._target_' names '") as err:
        load_run(path)
    assert "allow_targets=" in str(err.value) and "nothing was built" in str(err.value)
    assert not (tmp_path / "PWNED").exists()


def test_a_target_of_your_own_runs_only_when_this_command_allows_it(stored, tmp_path):
    loss = {"_target_": "tests.test_run.my_loss", "_partial_": True}
    path = save(tmp_path, copy.deepcopy(stored), loss=loss)
    with pytest.raises(UntrustedCheckpoint, match="tests.test_run.my_loss"):
        load_run(path)
    _, model, _ = load_run(path, allow_targets=["tests.test_run.my_loss"])
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


def test_interpolations_in_a_checkpoint_are_text(stored, tmp_path, monkeypatch):
    monkeypatch.setenv("RL_TEST_SECRET", "leaked")
    path = save(tmp_path, copy.deepcopy(stored))
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["rewardlab_config"]["data"]["chat_template"] = "${oc.env:RL_TEST_SECRET}"
    torch.save(checkpoint, path)
    cfg, _, _ = load_run(path)
    assert cfg.data.chat_template == "${oc.env:RL_TEST_SECRET}"


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
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_run(str(path))
    assert not (tmp_path / "PWNED").exists()


def test_known_targets_are_what_the_packaged_configs_name():
    targets = known_targets()
    assert "rewardlab.model.RewardModel" in targets and "torch.optim.AdamW" in targets
    assert not any(t.startswith(("builtins", "os.", "subprocess")) for t in targets)


KEY = st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=8)
VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEY | st.just("_target_"), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None)
@given(extra=st.dictionaries(KEY, VALUE, max_size=3))
def test_any_stored_target_outside_the_allow_list_is_refused(extra):
    """Property: whatever the nesting, a `_target_` that is not rewardlab's is found before anything is built."""
    from rewardlab.run import checked_config

    config = {g: {"_target_": "rewardlab.freeze.full"} for g in ("backbone", "model", "loss", "optimizer")}
    config |= {"scheduler": {}, "freeze": {}, "data": {"extra": extra}}
    foreign = [t for t in _targets(extra) if not (isinstance(t, str) and t in known_targets())]
    if foreign:
        with pytest.raises(UntrustedCheckpoint, match="not one of rewardlab's own targets"):
            checked_config(config, "x.ckpt", (), False)
    else:
        checked_config(config, "x.ckpt", (), False)


def _targets(node) -> list:
    if isinstance(node, dict):
        return ([node["_target_"]] if "_target_" in node else []) + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []
