"""Callbacks the tests plug into real runs from the command line (`+callbacks.x._target_=tests.helpers...`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class SignalAt(Callback):
    """Send `signum` to this process when training reaches `step`: a preemption or a kill, on cue."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum, self.sent = step, signum, False

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class RecordOpenFiles(Callback):
    """Append this process's open file descriptor count to `path` as each fit starts."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with open(self.path, "a") as f:
            f.write(f"{len(os.listdir('/proc/self/fd'))}\n")


class RecordGradNorms(Callback):
    """Append the total gradient norm the optimizer stepped with (after clipping) to `path`."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_before_zero_grad(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        grads = [p.grad.norm() for p in pl_module.parameters() if p.grad is not None]
        if grads:
            with open(self.path, "a") as f:
                f.write(f"{torch.stack(grads).norm().item()}\n")


class RecordLearningRates(Callback):
    """Append the learning rate of every parameter group, as each training batch starts, to `path`."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        with open(self.path, "a") as f:
            f.write(" ".join(str(g["lr"]) for g in trainer.optimizers[0].param_groups) + "\n")


class FailAtEpoch(Callback):
    """Raise when training reaches `epoch`, as a job preempted between epochs would stop."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"preempted at the start of epoch {self.epoch}")
