"""Fast settings decided from the hardware and the model, measured once and remembered.

- `trainer.precision=auto` and `backbone.attn_implementation=auto`: the combination of precision
  (fp32, or bf16 autocast with the head and the loss in fp32) and attention implementation (eager,
  sdpa) that runs a training step of this backbone fastest on this device; on a GPU, bf16 wherever
  it is supported.
- `model.gradient_checkpointing=auto`: recompute activations only for a batch whose estimated
  activation memory would not fit in the memory free when training starts.

Measurements take a few seconds and are cached in `<paths.cache_dir>/speed.json`, keyed by the
device, torch's version and the model's shape: once per machine and model, not per run.
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

PRECISIONS = ["32-true", "bf16-mixed"]
ATTENTIONS = ("eager", "sdpa")


def device_name(accelerator: str) -> str:
    if accelerator == "gpu":
        return torch.cuda.get_device_name()
    return f"cpu:{platform.processor() or platform.machine()}:{torch.get_num_threads()}threads"


class Measurements:
    """A small JSON file of measured choices, shared by the runs (and concurrent jobs) of a machine."""

    def __init__(self, cache_dir: str | Path):
        self.path = Path(cache_dir) / "speed.json"

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
    """Seconds for a forward and backward pass of 16 sequences of 128 tokens (a typical batch)."""
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, min(vocab, 1000), (16, 128), device=device)
    mask = torch.ones_like(ids)
    mask[8:, 96:] = 0  # some padding, as real batches have
    bf16 = precision.startswith("bf16")

    def step() -> None:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out.float().mean().backward()
        model.zero_grad(set_to_none=True)

    return _seconds(step, repeats=2)


def choose_speed(
    model: PreTrainedModel, accelerator: str, precision: str, attention: str | None, cache: Measurements
) -> tuple[str, str, str]:
    """(precision, attention implementation, why) for the settings left `auto`: the combination that
    runs a training step of this backbone fastest on this device (on a GPU, bf16 wherever it is
    supported). The model is switched to the chosen attention."""
    precisions = [precision]
    if precision == "auto":
        precisions = ["bf16-mixed"] if accelerator == "gpu" and torch.cuda.is_bf16_supported() else PRECISIONS
    attentions = list(ATTENTIONS) if attention == "auto" else [model.config._attn_implementation]
    config = model.config.get_text_config()
    shape = f"{type(model).__name__} h{config.hidden_size} l{config.num_hidden_layers} a{config.num_attention_heads}"
    key = f"speed | {device_name(accelerator)} | {shape} | {','.join(precisions)} | {','.join(attentions)}"
    device = "cuda" if accelerator == "gpu" else "cpu"

    def measure() -> dict[str, float]:
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
            return _measure()  # the global random state stays as it was: a seeded run is the same with or without

    def _measure() -> dict[str, float]:
        times, was_training = {}, model.training
        model.train()
        for name in attentions:
            try:
                model.set_attn_implementation(name)
            except (ValueError, ImportError):
                continue
            for p in precisions:
                times[f"{p} {name}"] = round(_train_step_seconds(model, device, p), 4)
        model.train(was_training)
        return times

    times, fresh = cache.get(key, measure)
    best = min(times, key=times.get)
    chosen_precision, chosen_attention = best.split()
    model.set_attn_implementation(chosen_attention)
    others = ", ".join(f"{k} {t / times[best]:.2f}x" for k, t in sorted(times.items(), key=lambda kv: kv[1])[1:])
    why = f"the fastest training step measured {'now' if fresh else 'before'} on this device" + (
        f" (step time of the others: {others})" if others else ""
    )
    return chosen_precision, chosen_attention, why


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
