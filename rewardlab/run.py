"""The shared core of the commands: build a run from its config, rebuild a trained run from a
checkpoint (safely: a checkpoint is data, never code), the datamodule for one split, scoring a
split's pairs, and closing loggers. `train`, `eval` and `export` are thin commands on top of it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from rewardlab import PACKAGE
from rewardlab.checkpoints import (
    MODEL_GROUPS,
    UntrustedCheckpoint,
    checked_config,
    linear_head,
    read_checkpoint,
    stored_config,
)
from rewardlab.checks import ConfigError, check_max_length, check_ranges, check_types
from rewardlab.data.formatting import ensure_pad_token
from rewardlab.data.module import PreferenceDataModule
from rewardlab.errors import UserError
from rewardlab.model import RewardModel
from rewardlab.redaction import redact
from rewardlab.speed import Measurements, choose_speed, limit_kernel_cache

log = logging.getLogger(__name__)

BUILT_GROUPS = (*MODEL_GROUPS, "data", "trainer", "callbacks", "logger")


def instantiate(node: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, except that rewardlab's own errors about a setting reach the user
    as they are (one line naming the key), not wrapped in Hydra's instantiation error."""
    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise


def build_model(cfg: DictConfig, backbone: Any) -> RewardModel:
    """The LightningModule from `cfg.model` and its groups (loss, optimizer, scheduler, freeze, head)."""
    model = instantiate(
        cfg.model,
        backbone=backbone,
        loss=instantiate(cfg.loss),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler),
        freeze=instantiate(cfg.freeze),
        head=instantiate(cfg.head),
    )
    model.run_config = redact(OmegaConf.to_container(cfg, resolve=True))
    return model


def check_lr_scale(cfg: DictConfig) -> None:
    """`recipe.lr_scale` scales the recipe's rate; with `optimizer.lr` set directly it would scale nothing
    and the jobs of a sweep over it would all train alike."""
    scale = OmegaConf.select(cfg, "recipe.lr_scale", default=1.0)
    raw = OmegaConf.to_container(cfg.optimizer, resolve=False).get("lr") if "optimizer" in cfg else None
    if scale != 1.0 and not (isinstance(raw, str) and "rl_recipe_lr" in raw):
        raise ConfigError(
            f"recipe.lr_scale={scale} scales the backbone's recipe rate, but optimizer.lr is set directly "
            f"({raw}, on the command line or by an experiment preset), so it would change nothing: sweep "
            "optimizer.lr instead, or leave optimizer.lr to the recipe"
        )


def loss_learns(cfg: DictConfig) -> bool:
    """Whether the configured loss learns parameters of its own (bt_ties' log ν): such a loss names their
    rate, `loss.lr`, and its parameters train in the optimizer group `loss`."""
    return "lr" in cfg.get("loss", {})


def check_loss_optimizer(cfg: DictConfig) -> None:
    """A loss that learns a parameter of its own cannot train under Adafactor, whose steps scale with a
    parameter's size: log ν starts at 0, so it would barely move."""
    if loss_learns(cfg) and cfg.get("optimizer", {}).get("_target_") == "torch.optim.Adafactor":
        raise ConfigError(
            "loss.lr: this loss learns a parameter of its own, which optimizer=adafactor would barely move (its "
            "steps scale with the parameter's size); use optimizer=adamw, lion or sgd"
        )


def build(cfg: DictConfig) -> tuple[PreferenceDataModule, RewardModel]:
    """The data and the model, from `cfg.backbone`, `cfg.data`, `cfg.model` and its groups; every
    setting is checked against what its target accepts before anything is built."""
    check_own_data(cfg.data, tested=cfg.get("test", True))
    precision, attention = cfg.trainer.precision, cfg.backbone.get("attn_implementation")
    for group in BUILT_GROUPS:  # `auto` is decided below, once the backbone exists
        check_types(cfg.get(group), group, allow_auto=("trainer.precision",))
    check_ranges(cfg)
    check_lr_scale(cfg)
    check_loss_optimizer(cfg)
    kernels = limit_kernel_cache(cfg.cpu_kernel_cache)  # before the first bf16 kernel is built
    backbone = instantiate(cfg.backbone)
    check_max_length(cfg.data.max_length, backbone.model.config)
    why, eager_up_to = "as configured", None
    if "auto" in (precision, attention):
        accelerator = (
            "gpu" if cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu"
        )
        precision, attention, eager_up_to, why = choose_speed(
            backbone.model, accelerator, precision, attention, Measurements(cfg.paths.speed_file)
        )
        cfg.trainer.precision = precision
        if "attn_implementation" in cfg.backbone:
            cfg.backbone.attn_implementation = attention
    log.info(
        "speed settings: precision %s, attention %s (%s); gradient checkpointing %s; %s",
        precision,
        f"eager up to {eager_up_to} tokens, then sdpa" if eager_up_to else backbone.model.config._attn_implementation,
        why,
        cfg.model.gradient_checkpointing,
        kernels,
    )
    model = build_model(cfg, backbone.model)
    model.eager_up_to = eager_up_to
    unit = getattr(model.loss_fn, "unit", "pairs")  # what the loss trains on: pairs, lists or points
    return instantiate(cfg.data, tokenizer=backbone.tokenizer, train_unit=unit), model


def check_own_data(data: DictConfig, tested: bool = True) -> None:
    """Your own training file with the embedded quiz still as validation or test data would report the
    quiz's accuracy as yours: refused, naming the keys to set (the test file only when it is tested)."""
    quiz = PACKAGE / "assets" / "quiz"
    if data.train_file and not Path(data.train_file).resolve().is_relative_to(quiz):
        left = [
            f"data.{s}_file"
            for s in ("val", "test")
            if (s == "val" or tested)
            and data.get(f"{s}_file")
            and Path(data[f"{s}_file"]).resolve().is_relative_to(quiz)
        ]
        if left:
            raise ConfigError(
                f"data.train_file is yours ({data.train_file}) but {' and '.join(left)} still point at the embedded "
                f"quiz; set {' and '.join(k + '=FILE' for k in left)} (or =null)"
            )


# Lightning's lines saying a limit or interval is at its default (conf/trainer/ names every one, so they
# would print on every run) and its advertising: not news.
LIGHTNING_NOISE = ("💡 Tip:", "was configured so", "Loading `train_dataloader` to estimate")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in LIGHTNING_NOISE)


def build_trainer(cfg: DictConfig, **kwargs: Any) -> L.Trainer:
    """The configured Trainer, without Lightning's log lines about defaults and without its own
    deprecated pytree call's warning (Lightning's, not the user's to fix)."""
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropNoise) for f in quiet.filters):
        quiet.addFilter(_DropNoise())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    return instantiate(cfg.trainer, **kwargs)


def finish_loggers(loggers: list[Logger], exit_code: int) -> None:
    """Flush every logger and close every wandb run with the job's exit status, so runs of a
    multirun never merge and a failed run does not show as finished."""
    for lg in loggers:
        lg.finalize("success" if exit_code == 0 else "failed")
        if isinstance(lg, WandbLogger) and lg._experiment is not None:
            lg.experiment.finish(exit_code=exit_code)


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
    checkpoint = read_checkpoint(ckpt_path)
    stored = stored_config(checkpoint, str(ckpt_path))
    cfg = checked_config(stored, str(ckpt_path), allow_targets, trust_remote_code)
    fill_newer_keys(cfg, str(ckpt_path))
    if cache_dir is not None and "cache_dir" in cfg.backbone:
        cfg.backbone.cache_dir = str(Path(cache_dir) / "models")
    cfg.model.feature_cache_dir = None
    for group in MODEL_GROUPS:  # what training checks before building, checked again: the file may be anyone's
        check_types(cfg.get(group), group)
    check_ranges(cfg)
    if not isinstance(cfg.head.get("_target_"), str) or cfg.head.get("_partial_") is not True:
        raise UntrustedCheckpoint(f"{ckpt_path}: its head config is not a head option rewardlab writes: {cfg.head}")
    backbone = instantiate(cfg.backbone)
    model = build_model(cfg, backbone.model)
    state = checkpoint["state_dict"]
    for name, value in model.state_dict().items():
        if name not in state:
            raise UntrustedCheckpoint(
                f"{ckpt_path}: its weights lack '{name}', which the model needs; nothing was loaded"
            )
        if state[name].shape != value.shape:
            raise UntrustedCheckpoint(
                f"{ckpt_path}: '{name}' has shape {tuple(state[name].shape)}, but the model its config describes "
                f"(head {cfg.head.get('_target_')}) has {tuple(value.shape)}; nothing was loaded"
            )
    model.load_state_dict(state)
    ensure_pad_token(backbone.tokenizer)
    return cfg, model.eval(), backbone.tokenizer


def fill_newer_keys(cfg: DictConfig, ckpt_path: str) -> None:
    """A checkpoint from an older rewardlab lacks the `model`, `data` and `loss` settings added since: they
    take the packaged defaults (the loss's from the packaged option of the same class), named in the log (a
    key the checkpoint has is never changed)."""
    conf = PACKAGE / "conf"
    packaged = {
        "model": OmegaConf.load(conf / "train.yaml").model,
        "data": OmegaConf.load(conf / "data" / "default.yaml"),
    }
    target = cfg.loss.get("_target_") if isinstance(cfg.get("loss"), DictConfig) else None
    options = (OmegaConf.load(path) for path in sorted((conf / "loss").glob("*.yaml")))
    if loss := next((o for o in options if target is not None and o.get("_target_") == target), None):
        packaged["loss"] = loss
    added = []
    if "head" not in cfg:
        cfg.head = linear_head()
        added.append("head=linear")
    for node, defaults in packaged.items():
        if node not in cfg:
            continue
        for key, value in OmegaConf.to_container(defaults, resolve=False).items():
            if key.startswith("_") or key == "defaults":
                continue
            stored = cfg[node].get(key)
            missing = {key: value} if key not in cfg[node] else {}
            if isinstance(value, dict) and isinstance(stored, DictConfig):  # columns added since: their own names
                missing = {f"{key}.{k}": v for k, v in value.items() if k not in stored}
            for name, new in missing.items():
                OmegaConf.update(cfg, f"{node}.{name}", new, force_add=True)
                added.append(f"{node}.{name}={new}")
    if added:
        log.warning("%s is from an older rewardlab: %s taken from today's defaults", ckpt_path, ", ".join(added))


def split_datamodule(
    data: DictConfig, split: str, tokenizer: PreTrainedTokenizerBase, cache_dir: str, report_dir: str | None
) -> PreferenceDataModule:
    """The datamodule for one split of `data` (the others unset), prepared and set up; its cache and
    report go to this command's folders, and it reads in this process (no loader workers)."""
    if split not in ("val", "test"):
        raise ConfigError(f"split={split!r}: expected val or test")
    if not data.get(f"{split}_file"):
        other = "val" if split == "test" else "test"
        raise ConfigError(f"this run has no {split} file: pass split={other}, or data.{split}_file=FILE")
    only = {f"{s}_file": None for s in ("train", "val", "test") if s != split}
    datamodule = instantiate(
        OmegaConf.merge(data, only, {"cache_dir": cache_dir, "report_dir": report_dir, "num_workers": 0}),
        tokenizer=tokenizer,
    )
    datamodule.prepare_data()
    datamodule.setup("test")
    return datamodule


def move_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch's tensors (also those in lists, as length chunks) on `device`; other values as they are."""

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device)
        return [move(v) for v in value] if isinstance(value, list) else value

    return {k: move(v) for k, v in batch.items()}


@torch.inference_mode()
def score_pairs(model: RewardModel, loader: DataLoader, bf16: bool = False) -> dict[str, np.ndarray]:
    """Rewards of chosen and rejected for every pair the loader yields, in pair-index order; for a head
    with uncertainty also each pair's (`uncertainty`: the spread of its heads' margins) and each
    response's (`chosen_std`, `rejected_std`)."""
    parts: dict[str, list[torch.Tensor]] = {}
    head = model.head
    for batch in loader:
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
            c, r = model.pair_outputs(move_to_device(batch, model.device))
        found = {"chosen": head.reward(c), "rejected": head.reward(r), "index": batch["index"]}
        if head.uncertainty(c) is not None:
            found |= {"uncertainty": head.uncertainty(c - r), "chosen_std": head.uncertainty(c),
                      "rejected_std": head.uncertainty(r)}  # fmt: skip
        for name, value in found.items():
            parts.setdefault(name, []).append(value.detach().cpu())
    order = torch.cat(parts["index"]).argsort()
    return {
        name: torch.cat(values)[order].numpy() if name == "index" else torch.cat(values)[order].double().numpy()
        for name, values in parts.items()
    }


@torch.inference_mode()
def predict_ratings(model: RewardModel, dataset: Any, collate: Any, groups_per_batch: int = 8) -> tuple:
    """Predicted ratings `(responses, attributes)` of every response of a group dataset (a split read as
    groups), in the dataset's order, with the data's own ratings beside them."""
    predicted, targets = [], []
    for start in range(0, len(dataset), groups_per_batch):
        batch = collate([dataset[i] for i in range(start, min(start + groups_per_batch, len(dataset)))])
        outputs = model.batch_outputs(move_to_device(batch, model.device))
        predicted.append(model.head.attributes(outputs).double().cpu())
        targets.append(batch["targets"].double())
    return torch.cat(predicted).numpy(), torch.cat(targets).numpy()
