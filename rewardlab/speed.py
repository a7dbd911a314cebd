"""Fast settings decided from the hardware and the model, measured once and remembered.

- `trainer.precision=auto`: bf16 autocast (the head and the loss stay fp32) on a GPU that supports
  it; on a CPU with AVX512-BF16 or AMX-BF16 where a training step of this backbone measured at least 5%
  faster in bf16 than in fp32 (small models, like the tiny default's 64-wide matrices, run slower under
  autocast, whose casts then cost more than they save); fp32 otherwise. A GPU is not probed: a short
  step there is bound by kernel launches, not arithmetic, and would understate bf16 (4x at real sizes).
- `backbone.attn_implementation=auto`: of eager and sdpa (transformers' default), the one a training
  step of this backbone measured faster on this device, by pass width: eager only where it is at least
  5% faster (on CPUs, short passes), sdpa from the width where it stops being so (long passes; it also
  keeps no attention matrix, so less memory).
- `cpu_kernel_cache`: how many bf16 kernels oneDNN keeps compiled (one per tensor shape); its default
  of 1024 holds about 500 MB more than 32 does on batches of varied lengths, for no speed.
- `model.gradient_checkpointing=auto`: recompute activations only for a batch whose estimated
  activation memory would not fit in the memory free when training starts.

The measurements take a few seconds and are remembered in `paths.speed_file` (per user and
machine, by default in ~/.cache/rewardlab/), keyed by the device, torch's version and the model's
shape: once per machine and model, not per run or folder.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
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
BF16_GAIN = 1.05  # bf16 autocast replaces fp32 only when a training step runs this much faster
PRECISION_WIDTH = 128  # the pass width the precision probe measures
PROBE_WIDTHS = (64, 128, 256)  # pass widths the attention probe measures


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

    def get(self, key: str, measure: Callable[[], Any], valid: Callable[[Any], bool]) -> tuple[Any, bool]:
        """The value stored under `key`, else `measure()` (stored); and whether it was measured now. A file
        that is not such a JSON object, or a stored value `valid` rejects, is measured again (warned)."""
        full = f"{key} | torch {torch.__version__}"
        with self._locked():
            known = self._read()
            if full in known and valid(known[full]):
                return known[full], False
            if full in known:
                log.warning("%s: the stored %r is not a measurement (%r); measuring again", self.path, key, known[full])
            value = measure()
            known[full] = value
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
            os.replace(tmp, self.path)  # atomic: a run killed while writing leaves the old file whole
            return value, True

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {}
        try:
            known = json.loads(self.path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            log.warning("%s: not a JSON file of measurements (%s); measuring again and replacing it", self.path, e)
            return {}
        if not isinstance(known, dict):
            log.warning("%s: not a JSON object of measurements; measuring again and replacing it", self.path)
            return {}
        return known


def _seconds_list(value: Any, count: int) -> bool:
    """Whether `value` is `count` finite positive numbers of seconds."""
    return (
        isinstance(value, list)
        and len(value) == count
        and all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < float("inf") for t in value)
    )


def _attention_times(value: Any) -> bool:
    """Whether `value` is {attention: {width: seconds}} for every attention and probe width."""
    return isinstance(value, dict) and all(
        isinstance(value.get(name), dict)
        and _seconds_list([value[name].get(str(w)) for w in PROBE_WIDTHS], len(PROBE_WIDTHS))
        for name in ATTENTIONS
    )


def _seconds(step: Callable[[], Any], repeats: int = 3) -> float:
    """The fastest of `repeats` timed runs of `step`, after one warm-up run."""
    step()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - started)
    return best


def _train_step_seconds(model: PreTrainedModel, device: str, precision: str, width: int) -> float:
    """Seconds for a forward and backward pass of 16 sequences of 3/4 to all of `width` tokens (a pass of
    8 pairs, as length grouping and chunks make them), padded to `width`, timed once after a warm-up."""
    vocab = model.config.get_text_config().vocab_size
    lengths = torch.linspace(width * 3 // 4, width, 16).long()
    ids = torch.randint(3, min(vocab, 1000), (16, width), device=device)
    mask = (torch.arange(width) < lengths[:, None]).long().to(device)
    bf16 = precision.startswith("bf16")

    def step() -> None:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out.float().mean().backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return _seconds(step, repeats=1)


def attention_plan(times: dict[str, dict[str, float]]) -> tuple[str, int | None]:
    """(attention for short passes, the widest pass that uses it where longer ones use sdpa, else None):
    eager up to the widest measured width where it and every narrower one were at least `EAGER_GAIN`
    faster, and on to halfway to the next measured width."""
    widths = sorted(int(w) for w in times["eager"])
    wins = 0
    while wins < len(widths) and times["eager"][str(widths[wins])] * EAGER_GAIN <= times["sdpa"][str(widths[wins])]:
        wins += 1
    if wins == 0:
        return "sdpa", None
    if wins == len(widths):
        return "eager", None
    return "eager", (widths[wins - 1] + widths[wins]) // 2


def limit_kernel_cache(capacity: int | None) -> str:
    """Keep at most `capacity` compiled oneDNN kernels (CPU bf16): its environment variable, read when
    the first kernel is built; a value already in the environment is yours and stays."""
    if capacity is None:
        return "oneDNN kernel cache as oneDNN decides"
    if "ONEDNN_PRIMITIVE_CACHE_CAPACITY" in os.environ:
        return f"oneDNN kernel cache {os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY']} (from the environment)"
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(capacity)
    return f"oneDNN kernel cache {capacity}"


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


def _interleaved(model: PreTrainedModel, device: str, runs: list[tuple[str, str, int]]) -> list[float]:
    """Median seconds of a training step for each (attention, precision, width) in `runs`, measured three
    times interleaved (a busy moment of the machine weighs on all alike), in eval mode (dropout off, as
    reward models train; gradients still flow), on `device` (the model is moved there for the probe: it is
    built on the CPU, and Lightning moves it later). The global random state, the model's attention and
    its device stay."""
    was_training, attention = model.training, model.config._attn_implementation
    home = next(model.parameters()).device
    times: list[list[float]] = [[] for _ in runs]
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
        model.eval().to(device)
        try:
            for _ in range(3):
                for i, (name, precision, width) in enumerate(runs):
                    model.set_attn_implementation(name)
                    times[i].append(_train_step_seconds(model, device, precision, width))
        finally:
            model.to(home)
            if device == "cuda":
                torch.cuda.empty_cache()
    model.set_attn_implementation(attention)
    model.train(was_training)
    return [round(sorted(t)[1], 4) for t in times]


def choose_speed(
    model: PreTrainedModel, accelerator: str, precision: str, attention: str | None, cache: Measurements
) -> tuple[str, str, int | None, str]:
    """(precision, attention implementation, eager_up_to, why) for the settings left `auto`: bf16 autocast
    on a GPU that supports it, and on a CPU with bf16 instructions where a training step ran at least
    `BF16_GAIN` faster with it;
    eager attention for passes up to `eager_up_to` tokens wide and sdpa beyond (None: the one
    implementation for all widths), from `attention_plan` of a measured training step at each of
    `PROBE_WIDTHS`. The model is switched to the chosen attention."""
    reasons = []
    config = model.config.get_text_config()
    shape = f"{type(model).__name__} h{config.hidden_size} l{config.num_hidden_layers} a{config.num_attention_heads}"
    device = "cuda" if accelerator == "gpu" else "cpu"
    if precision == "auto":
        bf16, why = bf16_capable(accelerator)
        precision = "bf16-mixed" if bf16 else "32-true"
        if bf16 and accelerator == "cpu":
            current = model.config._attn_implementation
            key = f"bf16 over fp32 | {device_name(accelerator)} | {shape} | {current} | width {PRECISION_WIDTH}"
            runs = [(current, p, PRECISION_WIDTH) for p in ("32-true", "bf16-mixed")]
            (fp32, half), fresh = cache.get(
                key, lambda: _interleaved(model, device, runs), valid=lambda v: _seconds_list(v, 2)
            )
            precision = "bf16-mixed" if fp32 >= BF16_GAIN * half else "32-true"
            why += (
                f", and a training step of {type(model).__name__} ran {fp32 / half:.2f}x as fast in bf16 as in fp32 "
                f"(measured {'now' if fresh else 'before'}; bf16 only where at least {BF16_GAIN:.2f}x)"
            )
        reasons.append(f"{precision}: {why}")
    if attention != "auto":
        return precision, model.config._attn_implementation, None, "; ".join(reasons) or "as configured"
    key = f"attention by width | {device_name(accelerator)} | {shape} | {precision}"
    runs = [(name, precision, width) for width in PROBE_WIDTHS for name in ATTENTIONS]

    def measure() -> dict[str, dict[str, float]]:
        medians = _interleaved(model, device, runs)
        return {name: {str(w): t for (n, _, w), t in zip(runs, medians) if n == name} for name in ATTENTIONS}

    times, fresh = cache.get(key, measure, valid=_attention_times)
    chosen, eager_up_to = attention_plan(times)
    model.set_attn_implementation(chosen)
    ratios = ", ".join(f"{w}: {times['sdpa'][w] / times['eager'][w]:.2f}x" for w in sorted(times["eager"], key=int))
    plan = f"eager up to {eager_up_to} tokens, then sdpa" if eager_up_to else f"{chosen} attention"
    reasons.append(
        f"{plan}: eager's speed over sdpa's by pass width {ratios} for {type(model).__name__} here "
        f"(measured {'now' if fresh else 'before'}; eager only where at least {EAGER_GAIN:.2f}x)"
    )
    return precision, chosen, eager_up_to, "; ".join(reasons)


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
