"""The shared core of the commands: build a run from its config, rebuild a trained run from a
checkpoint (safely: a checkpoint is data, never code), the datamodule for one split, scoring a
split's pairs, and closing loggers. `train`, `eval` and `export` are thin commands on top of it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from rewardlab.checks import ConfigError, check_max_length, check_types
from rewardlab.data.formatting import ensure_pad_token
from rewardlab.data.module import PreferenceDataModule
from rewardlab.data.rows import DataError
from rewardlab.freeze import FreezeError
from rewardlab.model import RewardModel
from rewardlab.redaction import redact

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent / "conf"
# Groups a checkpoint's model is rebuilt from; nothing else of its stored config is ever built.
MODEL_GROUPS = ("backbone", "model", "loss", "optimizer", "scheduler", "freeze")
BUILT_GROUPS = (*MODEL_GROUPS, "data", "trainer", "callbacks", "logger")
CONFIG_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}


class UntrustedCheckpoint(ValueError):
    """A checkpoint whose stored config names something rewardlab would not build on its own."""


def instantiate(node: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, except that rewardlab's own errors about a setting reach the user
    as they are (one line naming the key), not wrapped in Hydra's instantiation error."""
    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, (ConfigError, DataError, FreezeError)):
            raise e.__cause__ from None
        raise


def build_model(cfg: DictConfig, backbone: Any) -> RewardModel:
    """The LightningModule from `cfg.model` and its groups (loss, optimizer, scheduler, freeze)."""
    model = instantiate(
        cfg.model,
        backbone=backbone,
        loss=instantiate(cfg.loss),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler),
        freeze=instantiate(cfg.freeze),
    )
    model.run_config = redact(OmegaConf.to_container(cfg, resolve=True))
    return model


def build(cfg: DictConfig) -> tuple[PreferenceDataModule, RewardModel]:
    """The data and the model, from `cfg.backbone`, `cfg.data`, `cfg.model` and its groups; every
    setting is checked against what its target accepts before anything is built."""
    for group in BUILT_GROUPS:
        check_types(cfg.get(group), group)
    backbone = instantiate(cfg.backbone)
    check_max_length(cfg.data.max_length, backbone.model.config)
    return instantiate(cfg.data, tokenizer=backbone.tokenizer), build_model(cfg, backbone.model)


def build_trainer(cfg: DictConfig, **kwargs: Any) -> L.Trainer:
    return instantiate(cfg.trainer, **kwargs)


def finish_loggers(loggers: list[Logger], exit_code: int) -> None:
    """Flush every logger and close every wandb run with the job's exit status, so runs of a
    multirun never merge and a failed run does not show as finished."""
    for lg in loggers:
        lg.finalize("success" if exit_code == 0 else "failed")
        if isinstance(lg, WandbLogger) and lg._experiment is not None:
            lg.experiment.finish(exit_code=exit_code)


# ---------------------------------------------------------------------------- checkpoints are data


@cache
def known_targets() -> frozenset[str]:
    """Every `_target_` the packaged configs name: all that a checkpoint may ask rewardlab to build."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("_target_"), str):
                found.add(node["_target_"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in sorted(CONF_DIR.rglob("*.yaml")):
        walk(yaml.safe_load(path.read_text()))
    return frozenset(found)


def checked_config(stored: Any, source: str, allow_targets: Iterable[str], trust_remote_code: bool) -> DictConfig:
    """The groups of a checkpoint's stored config that get built (the model's and the data's), made
    safe to build from: every `_target_` must be one of rewardlab's own (or named in `allow_targets`
    by the user of this command), `trust_remote_code` stays off unless this command turns it on, and
    `${...}` is text, never an interpolation."""
    groups = (*MODEL_GROUPS, "data")
    if not isinstance(stored, dict) or not all(isinstance(stored.get(g), dict) for g in groups):
        raise UntrustedCheckpoint(f"{source}: its 'rewardlab_config' is not a rewardlab run config")
    allowed = known_targets() | set(allow_targets)

    def clean(node: Any, key: str) -> Any:
        if isinstance(node, dict):
            target = node.get("_target_")
            if "_target_" in node and not (isinstance(target, str) and target in allowed):
                raise UntrustedCheckpoint(
                    f"{source}: key '{key}._target_' names {target!r}, which is not one of rewardlab's own "
                    f"targets; nothing was built. If you trained with it yourself, allow it on this command "
                    f"line: 'allow_targets=[{target}]'"
                )
            out = {}
            for k, v in node.items():
                if not isinstance(k, str) or (k.startswith("_") and k.endswith("_") and k not in CONFIG_KEYS):
                    raise UntrustedCheckpoint(f"{source}: key '{key}.{k}' is not a config key rewardlab writes")
                if k == "trust_remote_code" and v is not False and not trust_remote_code:
                    log.warning(
                        "%s: '%s.%s' is %r in the checkpoint; off (pass trust_remote_code=true to allow)",
                        source,
                        key,
                        k,
                        v,
                    )
                    v = False
                out[k] = clean(v, f"{key}.{k}")
            return out
        if isinstance(node, list):
            return [clean(v, f"{key}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, str):
            return node.replace("${", "\\${")
        if node is None or isinstance(node, (bool, int, float)):
            return node
        raise UntrustedCheckpoint(f"{source}: key '{key}' holds a {type(node).__name__}, not a config value")

    return OmegaConf.create({g: clean(stored[g], g) for g in groups})


def load_run(
    ckpt_path: str,
    allow_targets: Iterable[str] = (),
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
) -> tuple[DictConfig, RewardModel, PreTrainedTokenizerBase]:
    """A trained model from a checkpoint alone: the checkpoint is read with `weights_only` (tensors and
    plain values, no pickled code), its stored config checked by `checked_config`, the model rebuilt
    from that config's model groups only, then its weights loaded. Files the rebuild writes (a
    converted backbone) go under this command's `cache_dir`, never where the checkpoint says.
    Returns (run config, model in eval mode, tokenizer)."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path: no such checkpoint {ckpt_path!r}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "rewardlab_config" not in checkpoint or "state_dict" not in checkpoint:
        raise UntrustedCheckpoint(f"{ckpt_path}: not a rewardlab checkpoint (no 'rewardlab_config' in it)")
    cfg = checked_config(checkpoint["rewardlab_config"], str(ckpt_path), allow_targets, trust_remote_code)
    if cache_dir is not None and "cache_dir" in cfg.backbone:
        cfg.backbone.cache_dir = str(Path(cache_dir) / "models")
    cfg.model.feature_cache_dir = None
    backbone = instantiate(cfg.backbone)
    model = build_model(cfg, backbone.model)
    model.load_state_dict(checkpoint["state_dict"])
    ensure_pad_token(backbone.tokenizer)
    return cfg, model.eval(), backbone.tokenizer


def split_datamodule(
    data: DictConfig, split: str, tokenizer: PreTrainedTokenizerBase, cache_dir: str, report_dir: str | None
) -> PreferenceDataModule:
    """The datamodule for one split of `data` (the others unset), prepared and set up; its cache and
    report go to this command's folders."""
    if split not in ("val", "test") or not data.get(f"{split}_file"):
        raise ValueError(f"split={split!r}: expected val or test, with data.{split}_file set")
    only = {f"{s}_file": None for s in ("train", "val", "test") if s != split}
    datamodule = instantiate(
        OmegaConf.merge(data, only, {"cache_dir": cache_dir, "report_dir": report_dir}), tokenizer=tokenizer
    )
    datamodule.prepare_data()
    datamodule.setup("test")
    return datamodule


@torch.inference_mode()
def score_pairs(model: RewardModel, loader: DataLoader, bf16: bool = False) -> dict[str, np.ndarray]:
    """Rewards of chosen and rejected for every pair the loader yields, in pair-index order."""
    chosen, rejected, index = [], [], []
    for batch in loader:
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
            c, r = model.pair_rewards({k: v.to(model.device) for k, v in batch.items()})
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
        index.append(batch["index"])
    order = torch.cat(index).argsort()
    return {
        "chosen": torch.cat(chosen)[order].numpy().astype(np.float64),
        "rejected": torch.cat(rejected)[order].numpy().astype(np.float64),
        "index": torch.cat(index)[order].numpy(),
    }
