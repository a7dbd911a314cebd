"""Fast settings decided from the hardware and the model, measured once and remembered.

- `trainer.precision=auto`: bf16 autocast (the head and the loss stay fp32) where the device has bf16
  instructions (a GPU that supports it; a CPU with AVX512-BF16 or AMX-BF16), fp32 otherwise: read from
  the hardware, so every run on a machine decides alike.
- `backbone.attn_implementation=auto`: sdpa (transformers' default), or eager where a training step
  of this backbone measured at least 5% faster with it on this device.
- `model.gradient_checkpointing=auto`: recompute activations only for a batch whose estimated
  activation memory would not fit in the memory free when training starts.

The attention measurement takes a few seconds and is remembered in `paths.speed_file` (per user and
machine, by default in ~/.cache/rewardlab/), keyed by the device, torch's version and the model's
shape: once per machine and model, not per run or folder.
"""

from __future__ import annotations

import fcntl
import json
import logging
import platform
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

log = logging.getLogger(__name__)

ATTENTIONS = ("eager", "sdpa")
EAGER_GAIN = 1.05  # eager replaces sdpa (transformers' default) only when a training step runs this much faster


def device_name(accelerator: str) -> str:
    if accelerator == "gpu":
        return torch.cuda.get_device_name()
    return f"cpu:{platform.processor() or platform.machine()}:{torch.get_num_threads()}threads"


class Measurements:
    """A small JSON file of measured choices, shared by the runs (and concurrent jobs) of a machine."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @contextmanager
    def _locked(self) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def get(self, key: str, measure: Callable[[], Any]) -> tuple[Any, bool]:
        """The value stored under `key`, else `measure()` (stored); and whether it was measured now."""
        full = f"{key} | torch {torch.__version__}"
        with self._locked():
            known = json.loads(self.path.read_text()) if self.path.exists() else {}
            if full in known:
                return known[full], False
            value = measure()
            known[full] = value
            self.path.write_text(json.dumps(known, indent=1, sort_keys=True))
            return value, True


def _seconds(step: Callable[[], Any], repeats: int = 3) -> float:
    """The fastest of `repeats` timed runs of `step`, after one warm-up run."""
    step()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - started)
    return best


def _train_step_seconds(model: PreTrainedModel, device: str, precision: str) -> float:
    """Seconds for a forward and backward pass of a typical batch (16 sequences of 20 to 128 tokens,
    padded to the longest), the best of two after a warm-up."""
    vocab = model.config.get_text_config().vocab_size
    lengths = torch.linspace(20, 128, 16).long()
    ids = torch.randint(3, min(vocab, 1000), (16, 128), device=device)
    mask = (torch.arange(128) < lengths[:, None]).long().to(device)
    bf16 = precision.startswith("bf16")

    def step() -> None:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out.float().mean().backward()
        model.zero_grad(set_to_none=True)

    return _seconds(step, repeats=2)


def bf16_capable(accelerator: str) -> tuple[bool, str]:
    """Whether this device runs bf16 matrix products natively, and why: a GPU that supports bf16, or a
    CPU with AVX512-BF16 or AMX-BF16 instructions (read from /proc/cpuinfo; elsewhere, fp32)."""
    if accelerator == "gpu":
        name = device_name("gpu")
        return (True, f"{name} supports bf16") if torch.cuda.is_bf16_supported() else (False, f"{name} has no bf16")
    info = Path("/proc/cpuinfo")
    flags = set(info.read_text().split()) if info.exists() else set()
    found = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if found:
        return True, f"this CPU has {' and '.join(found)}"
    return False, "this CPU has no bf16 instructions (avx512_bf16, amx_bf16)"


def choose_speed(
    model: PreTrainedModel, accelerator: str, precision: str, attention: str | None, cache: Measurements
) -> tuple[str, str, str]:
    """(precision, attention implementation, why) for the settings left `auto`: bf16 autocast where the
    device has bf16 instructions; of eager and sdpa, eager only where a training step of this backbone
    measured at least 5% faster with it (sdpa, transformers' default, otherwise). The model is
    switched to the chosen attention."""
    reasons = []
    if precision == "auto":
        bf16, why = bf16_capable(accelerator)
        precision = "bf16-mixed" if bf16 else "32-true"
        reasons.append(f"{precision}: {why}")
    if attention != "auto":
        return precision, model.config._attn_implementation, "; ".join(reasons) or "as configured"
    config = model.config.get_text_config()
    shape = f"{type(model).__name__} h{config.hidden_size} l{config.num_hidden_layers} a{config.num_attention_heads}"
    key = f"attention | {device_name(accelerator)} | {shape} | {precision}"
    device = "cuda" if accelerator == "gpu" else "cpu"

    def measure() -> dict[str, float]:
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
            return _measure()  # the global random state stays as it was: a seeded run is the same with or without

    def _measure() -> dict[str, list[float]]:
        times: dict[str, list[float]] = {name: [] for name in ATTENTIONS}
        was_training = model.training
        model.train()
        for _ in range(3):  # interleaved, so a busy moment of the machine weighs on both alike
            for name in ATTENTIONS:
                model.set_attn_implementation(name)
                times[name].append(_train_step_seconds(model, device, precision))
        model.train(was_training)
        return {name: round(sorted(t)[1], 4) for name, t in times.items()}  # the median of three

    times, fresh = cache.get(key, measure)
    chosen = "eager" if times["eager"] * EAGER_GAIN <= times["sdpa"] else "sdpa"
    model.set_attn_implementation(chosen)
    ratio = times["sdpa"] / times["eager"]
    reasons.append(
        f"{chosen} attention: eager {ratio:.2f}x the speed of sdpa for {type(model).__name__} here "
        f"(measured {'now' if fresh else 'before'}; eager only when at least {EAGER_GAIN:.2f}x)"
    )
    return precision, chosen, "; ".join(reasons)


def free_memory_bytes(accelerator: str) -> int:
    """Memory free for activations now: the GPU's free memory, or the system's available memory."""
    if accelerator == "gpu":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


@dataclass
class ActivationEstimate:
    """Activation memory of a training step, per Korthikanti et al. (2022): per layer and token,
    about (34 h + 5 a s) bytes in 16-bit (twice that in fp32), for width h, a heads, length s."""

    layers: int
    hidden: int
    heads: int
    bytes_per_value: int

    @classmethod
    def of(cls, model: PreTrainedModel, precision: str) -> ActivationEstimate:
        c = model.config.get_text_config()
        return cls(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, 2 if "16" in precision else 4)

    def bytes(self, sequences: int, length: int) -> int:
        per_token = (34 * self.hidden + 5 * self.heads * length) * self.bytes_per_value // 2
        return self.layers * sequences * length * per_token
