"""The reward model: a transformer backbone, a linear head on the last real token, a pairwise loss.

r(x, y) = head(h_last), where h_last is the backbone's final hidden state at the last position
whose attention mask is 1. Chosen and rejected sequences go through the backbone in one
concatenated `(2B, L)` batch; the first B rewards are the chosen ones.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import MaxMetric, Metric
from transformers import PreTrainedModel

Loss = Callable[[Tensor, Tensor, Tensor], Tensor]


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Position of the last 1 in each row of the mask: right or left padding give the same token."""
    width = attention_mask.shape[-1]
    return width - 1 - attention_mask.flip(-1).int().argmax(-1)


def position_ids(attention_mask: Tensor) -> Tensor:
    """0, 1, 2, ... counted over real tokens only, so left padding does not shift positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class PairMetrics(Metric):
    """Loss, strict accuracy (a tie is wrong), margin, reward means and spread over an epoch;
    sums, so they are exact over any batching and reduce across devices."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("pairs", "loss", "correct", "margin", "chosen", "rejected", "square"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, chosen: Tensor, rejected: Tensor, loss: Tensor) -> None:
        chosen, rejected = chosen.double(), rejected.double()
        self.pairs += chosen.numel()
        self.loss += loss.double() * chosen.numel()
        self.correct += (chosen > rejected).sum()
        self.margin += (chosen - rejected).sum()
        self.chosen += chosen.sum()
        self.rejected += rejected.sum()
        self.square += (chosen.square() + rejected.square()).sum()

    def compute(self) -> dict[str, Tensor]:
        n = self.pairs.clamp(min=1)
        mean = (self.chosen + self.rejected) / (2 * n)
        return {
            "loss": self.loss / n,
            "acc": self.correct / n,
            "margin": self.margin / n,
            "reward_chosen": self.chosen / n,
            "reward_rejected": self.rejected / n,
            "reward_std": (self.square / (2 * n) - mean.square()).clamp(min=0).sqrt(),
        }


def _eval_frozen(module: nn.Module) -> None:
    for child in module.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            child.eval()
        elif params:
            _eval_frozen(child)


class RewardModel(L.LightningModule):
    """Backbone + scalar head + pairwise loss, with optimizer and schedule built from `conf/`."""

    def __init__(
        self,
        backbone: PreTrainedModel,
        loss: Loss,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None,
        freeze: Callable[[RewardModel], None],
        head_lr_mult: float,
        head_init_std: float | None,
        gradient_checkpointing: bool,
    ):
        super().__init__()
        self.backbone = backbone
        self.backbone.config.use_cache = False
        hidden = backbone.config.get_text_config().hidden_size
        self.head = nn.Linear(hidden, 1, bias=False)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(hidden + 1) if head_init_std is None else head_init_std)
        self.loss_fn, self.optimizer_factory, self.scheduler_factory = loss, optimizer, scheduler
        self.head_lr_mult = head_lr_mult
        self.pass_positions = "position_ids" in inspect.signature(backbone.forward).parameters
        if getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None  # BERT-like [CLS] pooler: unused by a last-token reward, so not trained
        if gradient_checkpointing:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        freeze(self)
        self.train_metrics, self.val_metrics, self.test_metrics = PairMetrics(), PairMetrics(), PairMetrics()
        self.val_acc_best = MaxMetric()
        self.run_config: dict[str, Any] | None = None
        self.train()  # from_pretrained returns eval mode; Lightning keeps the mode it finds

    def train(self, mode: bool = True) -> RewardModel:
        """Train mode for what trains. A module whose parameters are all frozen stays in eval mode
        (no dropout), so a frozen trunk computes the same features every time, as at inference."""
        super().train(mode)
        if mode:
            _eval_frozen(self)
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Rewards, shape `(N,)`, float32 even under mixed precision (the head runs outside autocast)."""
        extra = {"position_ids": position_ids(attention_mask)} if self.pass_positions else {}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        with torch.autocast(device_type=last.device.type, enabled=False):
            return self.head(last.float()).squeeze(-1)

    def pair_rewards(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        chosen, rejected = self(batch["input_ids"], batch["attention_mask"]).chunk(2)
        return chosen, rejected

    def _metrics(self, split: str) -> PairMetrics:
        return getattr(self, f"{split}_metrics")

    def _step(self, batch: dict[str, Tensor], split: str) -> tuple[Tensor, Tensor, Tensor]:
        chosen, rejected = self.pair_rewards(batch)
        loss = self.loss_fn(chosen, rejected, batch["margin"])
        self._metrics(split).update(chosen.detach(), rejected.detach(), loss.detach())
        return loss, chosen, rejected

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, chosen, rejected = self._step(batch, "train")
        n = chosen.numel()
        self.log("train/loss_step", loss, prog_bar=True, batch_size=n)
        self.log("train/acc_step", (chosen > rejected).float().mean(), prog_bar=True, batch_size=n)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def _log_epoch(self, split: str) -> dict[str, Tensor]:
        """Log the epoch's metrics (already reduced across devices by torchmetrics) and reset."""
        values = self._metrics(split).compute()
        self.log_dict({f"{split}/{k}": v.float() for k, v in values.items()})
        self._metrics(split).reset()
        return values

    def setup(self, stage: str) -> None:
        """A loss that reads margins needs one for every pair: check all splits before training."""
        loss = getattr(self.loss_fn, "func", self.loss_fn)
        datamodule = self.trainer.datamodule if self.trainer is not None else None
        if not getattr(loss, "needs_margin", False) or datamodule is None:
            return
        for split, dataset in datamodule.datasets.items():
            missing = int(np.isnan(dataset.margin[dataset.index]).sum())
            if missing:
                raise ValueError(
                    f"loss={loss.__name__} needs a margin for every pair, but {missing} of "
                    f"{len(dataset)} {split} pairs have none (column "
                    f"'{datamodule.settings.columns['margin']}'); use loss=bradley_terry"
                )

    def on_train_start(self) -> None:
        self.val_acc_best.reset()  # the sanity check's validation must not count as a best

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        values = self._log_epoch("val")
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(values["acc"])
            self.log("val/acc_best", self.val_acc_best.compute().float(), prog_bar=True)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Weight decay for matrices only (not biases or norms); the head gets `head_lr_mult` × lr."""
        lr = self.optimizer_factory.keywords["lr"]
        decay, no_decay, head = [], [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (head if name.startswith("head.") else decay if p.ndim >= 2 else no_decay).append(p)
        groups = [
            {"params": decay},
            {"params": no_decay, "weight_decay": 0.0},
            {"params": head, "lr": lr * self.head_lr_mult},
        ]
        return [g for g in groups if g["params"]]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(params=self.parameter_groups())
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer, total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Carry the run's resolved config, so eval/export rebuild the model from the checkpoint alone."""
        if self.run_config is not None:
            checkpoint["rewardlab_config"] = self.run_config
