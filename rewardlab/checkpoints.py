"""A checkpoint is data, never code.

`read_checkpoint` reads one with `weights_only` (tensors and plain values: no pickled code), refusing
archives that would unpack into far more memory than their size (torch writes checkpoints
uncompressed) and naming the file when torch cannot read it. `checked_config` turns the run config
a checkpoint carries into one that rebuilds only what rewardlab itself would build: per group, the
`_target_`s its packaged configs name there (or a target the user allows on the command line), no
nested targets, no positional arguments, no interpolations, and `trust_remote_code` off unless the
command turns it on.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from rewardlab.errors import UserError

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent / "conf"
# Groups a checkpoint's model and data are rebuilt from; nothing else of its stored config is ever built.
MODEL_GROUPS = ("backbone", "model", "loss", "optimizer", "scheduler", "freeze", "head")
BUILT_FROM_CHECKPOINT = (*MODEL_GROUPS, "data")
ADDED_GROUPS = ("head",)  # groups older checkpoints lack: `rewardlab.run.fill_newer_keys` supplies them


def linear_head() -> dict[str, Any]:
    """The head of a checkpoint from before heads were a group: the one linear head there was."""
    return yaml.safe_load((CONF_DIR / "head" / "linear.yaml").read_text())


def is_run_config(config: Any) -> bool:
    """A mapping with every group a checkpoint's model and data are built from (or a later-added one
    missing), each a mapping."""
    return isinstance(config, dict) and all(
        isinstance(config.get(g), dict) or (g in ADDED_GROUPS and g not in config) for g in BUILT_FROM_CHECKPOINT
    )


CONFIG_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_"}


class UntrustedCheckpoint(UserError, ValueError):
    """A checkpoint rewardlab will not load: what it holds and what was expected."""


@cache
def group_targets() -> dict[str, frozenset[str]]:
    """For each group built from a checkpoint, the `_target_`s its packaged configs name at its top."""
    found: dict[str, set[str]] = {group: set() for group in BUILT_FROM_CHECKPOINT}
    for group in found:
        for path in (CONF_DIR / group).glob("*.yaml"):
            option = yaml.safe_load(path.read_text()) or {}
            target = option.get(group, {}).get("_target_") if group == "backbone" else option.get("_target_")
            if isinstance(target, str):
                found[group].add(target)
    found["model"].add(yaml.safe_load((CONF_DIR / "train.yaml").read_text())["model"]["_target_"])
    return {group: frozenset(targets) for group, targets in found.items()}


def known_targets() -> frozenset[str]:
    return frozenset().union(*group_targets().values())


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents (memory-mapped tensors), or an `UntrustedCheckpoint` naming the file."""
    path = checkpoint_file(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            packed = [m.filename for m in archive.infolist() if m.compress_type != zipfile.ZIP_STORED]
        if packed:
            raise UntrustedCheckpoint(
                f"{path}: holds compressed members ({packed[0]}, ...); torch writes checkpoints uncompressed, "
                "and a compressed one can unpack into far more memory than its size, so it is not read"
            )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError:  # torch's message advises weights_only=False: running the file's code
        raise UntrustedCheckpoint(
            f"{path}: not a rewardlab checkpoint: not a file of tensors and plain values only, and rewardlab "
            "never unpickles anything else (that would run code the file names)"
        ) from None
    except Exception as e:  # noqa: BLE001 - whatever torch says, the user hears which file and why
        raise UntrustedCheckpoint(
            f"{path}: not a checkpoint (torch cannot read it: {type(e).__name__}: "
            f"{str(e)[:200].partition(chr(10))[0]}); expected a .ckpt file rewardlab wrote"
        ) from None
    if not isinstance(checkpoint, dict):
        raise UntrustedCheckpoint(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint")
    return checkpoint


def checkpoint_file(path: str | Path, key: str = "ckpt_path") -> Path:
    """`path` when it is a file; a folder gets a message listing the checkpoints in it."""
    path = Path(path)
    if path.is_dir():  # the folder and its checkpoints/ (a run folder), not a walk of a whole tree
        found = sorted(str(p) for p in [*path.glob("*.ckpt"), *path.glob("checkpoints/*.ckpt")] if p.is_file())[:20]
        listing = ("; it holds " + ", ".join(found)) if found else "; it holds no .ckpt files"
        raise UserError(f"{key}={path} is a folder, expected a checkpoint file{listing}")
    if path.is_symlink() and not path.exists():
        raise FileNotFoundError(f"{key}: {str(path)!r} links to {str(path.readlink())!r}, which no longer exists")
    if not path.is_file():
        raise FileNotFoundError(f"{key}: no such checkpoint file {str(path)!r} (a .ckpt file)")
    return path


def stored_config(checkpoint: dict[str, Any], source: str) -> dict[str, Any]:
    """The run config a rewardlab checkpoint carries, checked to be one."""
    config = checkpoint.get("rewardlab_config")
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UntrustedCheckpoint(f"{source}: its 'state_dict' is not a mapping of tensors")
    if not is_run_config(config):
        raise UntrustedCheckpoint(f"{source}: its 'rewardlab_config' is not a rewardlab run config")
    return config


def checked_config(stored: Any, source: str, allow_targets: Iterable[str], trust_remote_code: bool) -> DictConfig:
    """The groups of a checkpoint's stored config that get built (the model's and the data's), safe
    to build from (see the module's docstring)."""
    if not is_run_config(stored):
        raise UntrustedCheckpoint(f"{source}: its 'rewardlab_config' is not a rewardlab run config")
    allowed = set(allow_targets)

    def refuse(key: str, what: str) -> UntrustedCheckpoint:
        return UntrustedCheckpoint(f"{source}: key '{key}' {what}; nothing was built")

    def clean(node: Any, key: str, top: bool) -> Any:
        if isinstance(node, dict):
            if "_target_" in node:
                target = node["_target_"]
                group = key.split(".")[0]
                if not top:
                    raise refuse(f"{key}._target_", f"names {target!r} inside a group; rewardlab's configs never do")
                if not (isinstance(target, str) and (target in group_targets()[group] or target in allowed)):
                    raise refuse(
                        f"{key}._target_",
                        f"names {target!r}, which is not one of rewardlab's own targets for {group!r}. If you "
                        f"trained with it yourself, allow it on this command line: 'allow_targets=[{target}]'",
                    )
            out = {}
            for k, v in node.items():
                if not isinstance(k, str) or (k.startswith("_") and k.endswith("_") and k not in CONFIG_KEYS):
                    raise refuse(f"{key}.{k}", "is not a config key rewardlab writes")
                if k == "trust_remote_code" and v is not False and not trust_remote_code:
                    log.warning("%s: '%s.%s' is %r in the checkpoint; off (pass trust_remote_code=true to allow)",
                                source, key, k, v)  # fmt: skip
                    v = False
                out[k] = clean(v, f"{key}.{k}", top=False)
            return out
        if isinstance(node, list):
            return [clean(v, f"{key}[{i}]", top=False) for i, v in enumerate(node)]
        if isinstance(node, str) and "${" in node:
            raise refuse(key, "holds '${', an interpolation; a stored config is resolved and never holds one")
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise refuse(key, f"holds a {type(node).__name__}, not a config value")

    return OmegaConf.create({g: clean(stored[g], g, top=True) for g in BUILT_FROM_CHECKPOINT if g in stored})


def save_run_state(checkpoint: dict[str, Any], run_config: dict[str, Any] | None, skipped_nonfinite: int) -> None:
    """Carry the run's resolved config, so eval/export rebuild the model from the checkpoint alone, and the
    random generators' state, so a resumed run draws what the uninterrupted one would have (dropout).
    Tensors only: the checkpoint stays loadable with `weights_only`."""
    if run_config is not None:
        checkpoint["rewardlab_config"] = run_config
    checkpoint["rng"] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    checkpoint["skipped_nonfinite"] = skipped_nonfinite


def restore_run_state(checkpoint: dict[str, Any], fitting: bool, group_names: list[str]) -> int:
    """Before Lightning loads a checkpoint: the random generators (when fitting), names for optimizer groups
    saved before they had them, and an ended epoch not counted against the next; returns the skipped count."""
    if "rng" in checkpoint and fitting:
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if "cuda" in checkpoint["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    for state in checkpoint.get("optimizer_states", []):
        groups = state.get("param_groups", [])
        if len(groups) == len(group_names):
            for group, name in zip(groups, group_names):
                group.setdefault("name", name)
        saved = [group.get("name") or "unnamed" for group in groups]
        if fitting and saved != group_names:
            raise UserError(
                f"the checkpoint's optimizer holds the parameter groups {', '.join(saved)}; this run trains "
                f"{', '.join(group_names)}, so its optimizer state cannot continue (a change to what trains): evaluate "
                "or export it, or start a new run"
            )
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs, batches = loop.get("epoch_progress", {}).get("current"), loop.get("epoch_loop.batch_progress")
    if epochs and batches and epochs["started"] == epochs["completed"]:
        # Saved after its epoch ended (max_steps on the epoch's last batch): the next epoch has not
        # started, but Lightning would count the finished epoch's batches against it and skip it.
        batches["current"] = dict.fromkeys(batches["current"], 0)
        batches["is_last_batch"] = False
    return checkpoint.get("skipped_nonfinite", 0)
