"""The reward model: a transformer backbone, a head on the last real token, a pairwise loss.

r(x, y) = head(h_last), where h_last is the backbone's final hidden state at the last position
whose attention mask is 1 (`model.pooling=last`; `mean` averages the real tokens' states, `first`
reads the first real token's, BERT's [CLS]). The head (`conf/head/`, `rewardlab.heads`) is one linear
output or several (an ensemble, ODIN's quality and length); the reward is made of them. Chosen and
rejected sequences go through the backbone in one concatenated `(2B, L)` batch; the first B are chosen.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MaxMetric
from transformers import PreTrainedModel

from rewardlab.checkpoints import restore_run_state, save_run_state
from rewardlab.checks import ConfigError
from rewardlab.features import FrozenTrunk, TrunkCache, open_trunk_cache
from rewardlab.freeze import eval_frozen, modules_after_blocks
from rewardlab.heads import Head
from rewardlab.losses import BradleyTerry, check_data, tie_of
from rewardlab.metrics import PairMetrics, PairOutcomes
from rewardlab.optim import clip_gradients, parameter_groups
from rewardlab.pooling import choose_pooling, pool, position_ids
from rewardlab.shared_prompt import SharedBatch, as_kind, decide_sharing, mask_kind, pack
from rewardlab.speed import ActivationEstimate, free_memory_bytes

log = logging.getLogger(__name__)


def _disable_dropout(module: nn.Module) -> None:
    """Dropout off everywhere (also attention dropout kept as a float, as in Llama)."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout_prob"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)


class RewardModel(L.LightningModule):
    """Backbone + reward head + pairwise loss, with optimizer and schedule built from `conf/`."""

    def __init__(
        self,
        backbone: PreTrainedModel,
        loss: Callable[[Tensor, Tensor, Tensor], Tensor],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None,
        freeze: Callable[[RewardModel], FrozenTrunk | None],
        head: Callable[[int, float | None], Head],
        head_lr_mult: float,
        head_init_std: float | None,
        gradient_checkpointing: bool | str,
        disable_dropout: bool,
        compile: bool,
        feature_cache_dir: str | None,
        skip_nonfinite: bool,
        share_prompt: bool | str,
        pooling: str,
    ):
        super().__init__()
        self.backbone = backbone
        self.backbone.config.use_cache = False
        if disable_dropout:
            _disable_dropout(backbone)
        hidden = backbone.config.get_text_config().hidden_size
        self.head = head(hidden, head_init_std)
        self.head.check(loss)
        self.loss_fn, self.optimizer_factory, self.scheduler_factory = loss, optimizer, scheduler
        # pairs are measured with the loss, or for a listwise or pointwise one Bradley–Terry (Plackett–Luce of two)
        self.pair_loss_fn = loss if getattr(loss, "unit", "pairs") == "pairs" else BradleyTerry()
        self.head_lr_mult = head_lr_mult
        self.pass_positions = "position_ids" in inspect.signature(backbone.forward).parameters
        self.pooling = choose_pooling(backbone, pooling)
        if getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None  # BERT-like [CLS] pooler: unused by a last-token reward, so not trained
        if gradient_checkpointing not in (True, False, "auto"):
            raise ConfigError(
                f"model.gradient_checkpointing: expected true, false or auto, got {gradient_checkpointing!r}"
            )
        self.gradient_checkpointing, self.checkpointing_now = gradient_checkpointing, gradient_checkpointing is True
        if gradient_checkpointing is True:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.activations: ActivationEstimate | None = None  # with `auto`: the estimate, and the memory it may use
        self.activation_budget = 0
        self.trunk: FrozenTrunk | None = freeze(self)
        if compile:
            self.backbone.compile(dynamic=True)
        self.feature_cache_dir = Path(feature_cache_dir) if feature_cache_dir else None
        self.trunk_cache: TrunkCache | None = None
        self.train_metrics, self.val_metrics, self.test_metrics = PairMetrics(), PairMetrics(), PairMetrics()
        self.test_outcomes = PairOutcomes()  # per pair, for the report's paired tests (`rewardlab.report`)
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # in checkpoints: a resumed run remembers the best so far
        self.skip_nonfinite, self.skipped_nonfinite = skip_nonfinite, 0
        if share_prompt not in (True, False, "auto"):
            raise ConfigError(f"model.share_prompt: expected true, false or auto, got {share_prompt!r}")
        self.share_prompt = share_prompt
        self.sharing: bool | None = None if share_prompt else False  # decided in `setup`
        self.eager_up_to: int | None = None  # set by `rewardlab.run.build` where attention is measured by width
        self.run_config: dict[str, Any] | None = None
        self.apply_settings_on_resume = False  # set when a run resumes with resume.allow_changes
        self.train()  # from_pretrained returns eval mode; Lightning keeps the mode it finds

    def train(self, mode: bool = True) -> RewardModel:
        """Train mode for what trains. A module whose parameters are all frozen stays in eval mode
        (no dropout), so a frozen trunk computes the same features every time, as at inference."""
        super().train(mode)
        if mode:
            eval_frozen(self)
        return self

    def attention_for(self, width: int) -> None:
        """With a measured switch (`eager_up_to`, from `backbone.attn_implementation=auto`): eager
        attention for passes up to that many tokens wide, sdpa for wider ones."""
        if self.eager_up_to is not None:
            wanted = "eager" if width <= self.eager_up_to else "sdpa"
            if self.backbone.config._attn_implementation != wanted:
                self.backbone.set_attn_implementation(wanted)

    def last_hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The backbone's final hidden states pooled per sequence (`model.pooling`), `(N, hidden)`."""
        self.attention_for(input_ids.shape[1])
        extra = {"position_ids": position_ids(attention_mask)} if self.pass_positions else {}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return pool(hidden, attention_mask, self.pooling)

    def outputs(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The head's outputs for each sequence, `(N, outputs)`, float32 (a linear head: `(N, 1)`, the reward)."""
        return self.head(self.last_hidden(input_ids, attention_mask))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Rewards, shape `(N,)`, float32."""
        return self.head.reward(self.outputs(input_ids, attention_mask))

    def pair_outputs(self, batch: dict[str, Tensor], split: str | None = None) -> tuple[Tensor, Tensor]:
        """Head outputs of chosen and rejected `(B, outputs)` from one `(2B, L)` pass; with a feature
        cache for `split`, the frozen trunk's outputs are read back instead of recomputed."""
        if self.trunk_cache is not None and split in self.trunk_cache.caches:
            return self.trunk_cache.outputs(self, batch, split).chunk(2)
        return self.batch_outputs(batch).chunk(2)

    def shared_hidden(self, packed: SharedBatch) -> Tensor:
        """Final hidden states where `packed` reads its rewards: chosen ones, then rejected ones."""
        self.attention_for(packed.input_ids.shape[1])
        hidden = self.backbone(
            input_ids=packed.input_ids.to(self.device),
            attention_mask=as_kind(packed.attention_mask.to(self.device), mask_kind(self.backbone)),
            position_ids=packed.position_ids.to(self.device),
        ).last_hidden_state
        return hidden.flatten(0, 1)[packed.read.to(self.device)]

    def batch_outputs(self, batch: dict[str, Any]) -> Tensor:
        """Head outputs of a batch's `(2B, L)` sequences: with a shared prompt, one row per pair where that
        processes fewer tokens; else where the collator grouped them by length (`chunks`), one pass per
        group, each only as wide as its own longest sequence."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.sharing:
            group = batch.get("group")
            members = None if group is None else [torch.nonzero(group == g).flatten().tolist() for g in group.unique()]
            packed = pack(ids, mask, members)
            if packed.tokens < batch.get("padded_tokens", ids.numel()):
                batch["padded_tokens"] = packed.tokens  # what this pass processes, for the throughput
                batch["processed_real_tokens"] = packed.real_tokens
                return self.head(self.shared_hidden(packed))
        if "chunks" not in batch:
            return self.outputs(ids, mask)
        right = bool(mask[:, 0].all())  # right padding: every row starts with a real token
        parts = []
        for rows, width in zip(batch["chunks"], batch["chunk_widths"]):
            cols = slice(0, width) if right else slice(ids.shape[1] - width, None)
            parts.append(self.outputs(ids[rows][:, cols], mask[rows][:, cols]))
        return torch.cat(parts)[torch.argsort(torch.cat(batch["chunks"]))]

    def setup(self, stage: str) -> None:
        """Before fitting: whether pairs share their prompt's pass; check the data has what the loss needs
        (margins, a loss for its ties); open the frozen-trunk caches."""
        if self.sharing is None:
            self.sharing = decide_sharing(self, self.share_prompt)  # (only `last` pooling can share)
        datamodule = self.trainer.datamodule if self.trainer is not None else None
        if datamodule is None:
            return
        check_data(self.pair_loss_fn, datamodule, fitting=stage == "fit")
        if stage == "fit" and datamodule.has("train"):
            self.head.prepare(datamodule.pairs_in("train"))
        if stage == "fit" and hasattr(self.head, "fit_targets") and "train" in datamodule.lists:
            self.head.fit_targets(torch.from_numpy(datamodule.lists["train"].targets))
        if stage == "fit" and self.trunk is not None and self.feature_cache_dir is not None:
            self.train()  # frozen modules in eval mode, as they will run
            self.trunk_cache = open_trunk_cache(
                self.backbone,
                self.trunk,
                self._trunk_modules(),
                {split: datamodule.sequences(split) for split in ("train", "val") if datamodule.has(split)},
                self.feature_cache_dir,
                str(self.trainer.precision),
                self.pooling,
            )

    def feature_cache_stats(self) -> dict[str, int]:
        """`features/<split>/hits|misses|filled` of the frozen-trunk cache, for results.json."""
        caches = self.trunk_cache.caches if self.trunk_cache is not None else {}
        return {f"features/{split}/{k}": v for split, cache in caches.items() for k, v in cache.stats().items()}

    def _trunk_modules(self) -> list[nn.Module]:
        """The modules that run before the first trainable one (all of them for head_only)."""
        if self.trunk.n_frozen is None:
            return list(self.backbone.modules())
        blocks = self.backbone.get_submodule(self.trunk.blocks)
        later = {id(m) for block in blocks[self.trunk.n_frozen :] for m in block.modules()}
        later |= {id(m) for m in modules_after_blocks(self.backbone, self.trunk.blocks)}
        return [m for m in self.backbone.modules() if id(m) not in later]

    def on_train_start(self) -> None:
        """A run resumed with changed optimizer or schedule settings: the checkpoint restored the old
        learning rates and hyperparameters into the optimizer; put the configured ones in their place
        (the schedule's shape comes from the config already, its step count from the checkpoint)."""
        if not self.apply_settings_on_resume:
            return
        configured = self.optimizer_factory(params=self.parameter_groups()).param_groups
        optimizer = self.trainer.optimizers[0]
        for group, new in zip(optimizer.param_groups, configured):
            group.update({k: v for k, v in new.items() if k != "params"}, initial_lr=new["lr"])
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            scheduler.base_lrs = [g["lr"] for g in configured]
            for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base * factor(scheduler.last_epoch)

    def on_train_end(self) -> None:
        if self.trainer.world_size == 1 and self.trunk_cache is not None:
            for cache in self.trunk_cache.caches.values():
                cache.save()

    def _metrics(self, split: str) -> PairMetrics:
        return getattr(self, f"{split}_metrics")

    def on_fit_start(self) -> None:
        """With `gradient_checkpointing=auto`, a batch is checkpointed only when its estimated activations
        would not fit in half the memory free now (the other half is for weights, optimizer and data)."""
        if self.gradient_checkpointing != "auto":
            return
        self.activations = ActivationEstimate.of(self.backbone, str(self.trainer.precision))
        self.activation_budget = free_memory_bytes("gpu" if self.device.type == "cuda" else "cpu") // 2
        log.info(
            "gradient checkpointing auto: off, and on only for a batch whose activations (estimated from its "
            "shape and the backbone's) exceed %.1f GB, half the memory free now",
            self.activation_budget / 2**30,
        )

    def _checkpoint_if_needed(self, batch: dict[str, Tensor]) -> None:
        if self.activations is None:
            return
        sequences, length = batch["input_ids"].shape
        needed = self.activations.bytes(sequences, length)
        if (needed > self.activation_budget) != self.checkpointing_now:
            self.checkpointing_now = not self.checkpointing_now
            if self.checkpointing_now:
                log.info(
                    "gradient checkpointing on: a batch of %d x %d tokens needs about %.1f GB of activations, "
                    "more than the %.1f GB budget",
                    sequences,
                    length,
                    needed / 2**30,
                    self.activation_budget / 2**30,
                )
                self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.backbone.gradient_checkpointing_disable()

    def _step(self, batch: dict[str, Tensor], split: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(what training minimises, the loss of the reward, chosen's and rejected's head outputs `(B, outputs)`).
        A head with an objective of its own (ensemble, ODIN) trains on it and logs it as `train/objective`
        with its parts; the metrics' loss is always the pairwise loss of the reward, comparable across heads.
        A batch of groups (`loss=plackett_luce`, `loss=regression`) trains on its loss; its outputs are those
        of the pairs within its groups, for the accuracy."""
        if "group" in batch:
            return self._group_step(batch)
        chosen, rejected = self.pair_outputs(batch, split)
        loss = self._pair_loss(self.head.reward(chosen), self.head.reward(rejected), batch)
        if split != "train" or type(self.head).objective is Head.objective:
            return loss, loss, chosen, rejected
        objective, parts = self.head.objective(self.loss_fn, chosen, rejected, batch)
        for name, value in {"objective": objective, **parts}.items():
            self.log(f"train/{name}", value, batch_size=chosen.shape[0])  # per step, this rank's
        return objective, loss, chosen, rejected

    def _pair_loss(self, chosen: Tensor, rejected: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """The loss of pairs' rewards. Ties (evaluation only: training refuses them) count only for a loss
        that learns from ties; for another, the loss is over the batch's decisive pairs (0 if none)."""
        loss_fn = self.pair_loss_fn
        if "tie" not in batch or getattr(loss_fn, "handles_ties", False):
            return loss_fn(chosen, rejected, batch["margin"], **tie_of(loss_fn, batch))
        decisive = ~batch["tie"].to(chosen.device)
        if not bool(decisive.any()):
            return (chosen - rejected).sum() * 0
        return loss_fn(chosen[decisive], rejected[decisive], batch["margin"][decisive])

    def _group_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """A batch of groups: every response in one pass, the loss of the lists (or of each response's
        ratings); the pairs within groups (higher score first) give the accuracy metrics."""
        outputs = self.batch_outputs(batch)
        if self.loss_fn.unit == "points":
            loss = self.loss_fn(outputs, self.head.normalised(batch["targets"]), self.head.log_var)
        else:
            loss = self.loss_fn(self.head.reward(outputs), batch["group"], batch["scores"])
        group, scores = batch["group"], batch["scores"]
        better, worse = torch.nonzero((group[:, None] == group[None, :]) & (scores[:, None] > scores[None, :])).T
        tokens = batch["response_tokens"]
        batch["pair_response_tokens"] = torch.cat([tokens[better.cpu()], tokens[worse.cpu()]])
        return loss, loss, outputs[better.to(outputs.device)], outputs[worse.to(outputs.device)]

    def _update_metrics(
        self, split: str, batch: dict[str, Tensor], chosen: Tensor, rejected: Tensor, loss: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Epoch metrics of the rewards, with the responses' lengths and (ensembles) the pairs' uncertainty:
        the spread of the heads' margins. Returns them (detached): chosen's and rejected's rewards, the spread."""
        chosen, rejected, head = chosen.detach(), rejected.detach(), self.head
        found = head.reward(chosen), head.reward(rejected), head.uncertainty(chosen - rejected)
        tokens = batch.get("pair_response_tokens", batch["response_tokens"])
        self._metrics(split).update(found[0], found[1], loss.detach(), tokens, found[2], batch.get("tie"))
        return found

    def _finite(self, loss: Tensor, batch: dict[str, Tensor], batch_idx: int) -> bool:
        """A NaN or inf loss stops the run naming the step and the pairs; with `skip_nonfinite` the
        batch is skipped (no update) and counted. Decided on all devices together, so ranks agree."""
        if self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            return True
        datamodule = self.trainer.datamodule
        pairs = batch["index"].tolist()
        where = (
            f"step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx}), pairs from "
            f"{datamodule.rows_of('train', pairs) if datamodule is not None else pairs}"
        )
        if not self.skip_nonfinite:
            raise FloatingPointError(
                f"loss is {loss.item()} at {where}; model.skip_nonfinite=true skips such batches instead"
            )
        self.skipped_nonfinite += 1
        log.warning(
            "skipped the batch at %s: loss is %s (%d skipped so far)", where, loss.item(), self.skipped_nonfinite
        )
        return False

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        self._checkpoint_if_needed(batch)
        objective, loss, chosen, rejected = self._step(batch, "train")
        if not self._finite(objective, batch, batch_idx):
            return None  # Lightning skips backward and the optimizer step
        c, r, _ = self._update_metrics("train", batch, chosen, rejected, loss)
        n = max(chosen.shape[0], 1)  # a batch of groups may hold no pair (ratings of one response)
        self.log("train/loss_step", loss, prog_bar=True, batch_size=n, sync_dist=True)  # mean over devices
        if len(c):  # (no accuracy for a batch without a pair)
            self.log("train/acc_step", (c > r).float().mean(), prog_bar=True, batch_size=n, sync_dist=True)
        return objective

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        _, loss, chosen, rejected = self._step(batch, "val")
        self._update_metrics("val", batch, chosen, rejected, loss)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        _, loss, chosen, rejected = self._step(batch, "test")
        c, r, spread = self._update_metrics("test", batch, chosen, rejected, loss)
        keep = ~batch["tie"] if "tie" in batch else slice(None)  # paired tests compare decisive pairs
        tokens = batch["response_tokens"].view(2, -1)[:, keep].flatten()
        self.test_outcomes.update(
            batch["index"][keep], c[keep], r[keep], tokens, None if spread is None else spread[keep]
        )

    def on_test_epoch_start(self) -> None:
        self.test_outcomes.reset()

    def _log_epoch(self, split: str) -> dict[str, Tensor]:
        """Log the epoch's metrics (already reduced across devices by torchmetrics) and reset."""
        values = self._metrics(split).compute()
        self.log_dict({f"{split}/{k}": v.float() for k, v in values.items()})
        self._metrics(split).reset()
        return values

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
        """See `rewardlab.optim.parameter_groups`; only a loss with parameters of its own has an `lr`."""
        lr = self.optimizer_factory.keywords["lr"]
        return parameter_groups(self.named_parameters(), lr, self.head_lr_mult, getattr(self.loss_fn, "lr", lr))

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip here unless a gradient scaler (fp16) is in use: Lightning's precision plugin refuses
        fused optimizers even in bf16 and fp32, where there is nothing to unscale."""
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if gradient_clip_val:
            clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        return None

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(params=self.parameter_groups())
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer, total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_run_state(checkpoint, self.run_config, self.skipped_nonfinite)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        names = [g["name"] for g in self.parameter_groups()]
        fitting = "rng" in checkpoint and self.trainer.state.fn == "fit"  # (no trainer needed without rng state)
        self.skipped_nonfinite = restore_run_state(checkpoint, fitting, names)
