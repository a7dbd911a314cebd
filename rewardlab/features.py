"""Frozen trunks cost nothing twice: cache what the frozen part of the backbone computes.

With `freeze=head_only` the whole backbone is frozen, so the last-token hidden state of a sequence
is the same every epoch; with `freeze=last_n` so is the input to the first trainable block. The
first epoch computes and stores them; later epochs read them back and run only the head (or the
trainable blocks). Values live in a file read and written per batch (`pread`/`pwrite`), so memory
stays bounded whatever the dataset size, and the OS page cache keeps hot data fast. The folder is
keyed by the data's cache, the frozen weights and the precision, so a later run with the same
frozen trunk (another job of a sweep) starts with a full cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

log = logging.getLogger(__name__)


@dataclass
class FrozenTrunk:
    """What a freezing strategy leaves frozen: the whole backbone (`n_frozen is None`, features are
    last-token hidden states) or the first `n_frozen` blocks of `blocks` (features are every token's
    input to the first trainable block)."""

    blocks: str | None = None
    n_frozen: int | None = None


def active_dropout(modules: Iterator[nn.Module]) -> list[str]:
    """Modules that would make a forward pass random right now (dropout in training mode)."""
    found = []
    for m in modules:
        if not m.training:
            continue
        if isinstance(m, nn.Dropout) and m.p > 0:
            found.append(type(m).__name__)
        for attr in ("attention_dropout", "dropout_prob"):
            if isinstance(getattr(m, attr, None), float) and getattr(m, attr) > 0:
                found.append(f"{type(m).__name__}.{attr}")
    return found


def weights_digest(module: nn.Module, names: Callable[[str], bool]) -> str:
    """A hash of the frozen parameters: a cache made with other weights is another cache."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        if names(name):
            h.update(name.encode())
            h.update(p.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:20]


class FeatureCache:
    """Features of every sequence of one tokenized split: a vector each (`per_token=False`) or one
    per real token (`per_token=True`, laid out like the split's token ids)."""

    def __init__(self, folder: Path, lengths: np.ndarray, hidden: int, per_token: bool):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.hidden, self.per_token = folder, hidden, per_token
        rows = lengths if per_token else np.ones_like(lengths)
        self.offsets = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])
        self.path = folder / "values.f32"
        self.filled_path = folder / "filled.npy"
        mode = "r+b" if self.path.exists() else "w+b"
        self.file = open(self.path, mode)  # noqa: SIM115 - lives as long as the cache
        self.file.truncate(int(self.offsets[-1]) * hidden * 4)
        self.filled = np.load(self.filled_path) if self.filled_path.exists() else np.zeros(len(lengths), bool)
        self.hits = self.misses = 0

    def has(self, sequences: np.ndarray) -> bool:
        return bool(self.filled[sequences].all())

    def _span(self, i: int) -> tuple[int, int]:
        row = self.hidden * 4
        return int(self.offsets[i]) * row, int(self.offsets[i + 1] - self.offsets[i]) * row

    def read(self, i: int) -> np.ndarray:
        start, size = self._span(i)
        data = os.pread(self.file.fileno(), size, start)
        return np.frombuffer(data, dtype=np.float32).reshape(-1, self.hidden)

    def write(self, i: int, values: np.ndarray) -> None:
        start, size = self._span(i)
        assert values.nbytes == size, f"feature of sequence {i}: {values.nbytes} bytes, expected {size}"
        os.pwrite(self.file.fileno(), np.ascontiguousarray(values, dtype=np.float32).tobytes(), start)
        self.filled[i] = True

    def save(self) -> None:
        """Persist which sequences are filled, so later runs start from a full cache."""
        self.file.flush()
        tmp = self.folder / "filled.tmp.npy"
        np.save(tmp, self.filled)
        os.replace(tmp, self.filled_path)


def sequence_ids(pair_index: Tensor) -> np.ndarray:
    """Sequence numbers of a batch in its `(2B, ...)` order: chosen 2j for every pair j, then rejected 2j + 1."""
    j = pair_index.cpu().numpy()
    return np.concatenate([2 * j, 2 * j + 1])


def describe(cache_key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cache_key, sort_keys=True).encode()).hexdigest()[:20]


@contextmanager
def skip_blocks(blocks: nn.ModuleList, n_frozen: int, features: Tensor) -> Iterator[None]:
    """Run the backbone without its first `n_frozen` blocks: those return their input unchanged,
    except the last, which returns the cached `features` (in the output structure it had)."""
    originals = {i: blocks[i].forward for i in range(n_frozen)}

    def replace(i: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            out = features if i == n_frozen - 1 else hidden
            return out if blocks[i]._rl_tensor_output else (out,) + (None,) * (blocks[i]._rl_tuple_len - 1)

        return forward

    try:
        for i in originals:
            blocks[i].forward = replace(i)
        yield
    finally:
        for i, forward in originals.items():
            blocks[i].forward = forward


@contextmanager
def capture_block_output(blocks: nn.ModuleList, n_frozen: int, store: list[Tensor]) -> Iterator[None]:
    """Record what the last frozen block returns (and the structure of every frozen block's output)."""

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        module._rl_tensor_output = isinstance(output, Tensor)
        module._rl_tuple_len = 1 if module._rl_tensor_output else len(output)
        if module is blocks[n_frozen - 1]:
            store.append(output if module._rl_tensor_output else output[0])

    handles = [blocks[i].register_forward_hook(hook) for i in range(n_frozen)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
