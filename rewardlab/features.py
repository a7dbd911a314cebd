"""Frozen trunks cost nothing twice: cache what the frozen part of the backbone computes.

With `freeze=head_only` the whole backbone is frozen, so the last-token hidden state of a sequence
is the same every epoch; with `freeze=last_n` so is the input to the first trainable block. The
first epoch computes and stores them; later epochs read them back and run only the head (or the
trainable blocks). Values live in a file read and written per batch (`pread`/`pwrite`), so memory
stays bounded whatever the dataset size, and the OS page cache keeps hot data fast. A cache folder
is keyed by the tokenized split, the frozen weights and the precision, so a later run with the same
frozen trunk (another job of a sweep) starts with a full cache.

`FeatureCache` is the store (lookup/store/stats); `TrunkCache` runs a batch through the model with
it, and `open_trunk_cache` decides whether a model's trunk can be cached at all.
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
import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


@dataclass
class FrozenTrunk:
    """What a freezing strategy leaves frozen: the whole backbone (`n_frozen is None`, features are
    last-token hidden states) or the first `n_frozen` blocks of `blocks` (features are every token's
    input to the first trainable block)."""

    blocks: str | None = None
    n_frozen: int | None = None


class FeatureCache:
    """Features of every sequence of one tokenized split: a vector each (`per_token=False`) or one
    per real token (`per_token=True`, laid out like the split's token ids), stored as float32 and
    handed back in the dtype they were computed in."""

    def __init__(self, folder: Path, lengths: np.ndarray, hidden: int, per_token: bool):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.hidden, self.per_token = folder, hidden, per_token
        rows = lengths if per_token else np.ones_like(lengths)
        self.offsets = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])
        self.path, self.filled_path, self.meta_path = folder / "values.f32", folder / "filled.npy", folder / "meta.json"
        self.file = open(self.path, "r+b" if self.path.exists() else "w+b")  # noqa: SIM115 - lives as long as the cache
        self.file.truncate(int(self.offsets[-1]) * hidden * 4)
        self.filled = np.load(self.filled_path) if self.filled_path.exists() else np.zeros(len(lengths), bool)
        meta = json.loads(self.meta_path.read_text()) if self.meta_path.exists() else {}
        self.dtype: torch.dtype = getattr(torch, meta.get("dtype", "float32"))
        self.hits = self.misses = 0

    def _span(self, i: int) -> tuple[int, int]:
        row = self.hidden * 4
        return int(self.offsets[i]) * row, int(self.offsets[i + 1] - self.offsets[i]) * row

    def lookup(self, sequences: np.ndarray) -> list[np.ndarray] | None:
        """The features of every sequence (each `(rows, hidden)`), or None unless all are stored."""
        if not self.filled[sequences].all():
            self.misses += len(sequences)
            return None
        self.hits += len(sequences)
        out = []
        for i in sequences:
            start, size = self._span(int(i))
            out.append(np.frombuffer(os.pread(self.file.fileno(), size, start), np.float32).reshape(-1, self.hidden))
        return out

    def store(self, sequences: np.ndarray, values: list[Tensor]) -> None:
        """Store each sequence's features (the dtype they were computed in is remembered)."""
        for i, value in zip(sequences, values):
            start, size = self._span(int(i))
            data = np.ascontiguousarray(value.detach().float().cpu().numpy(), np.float32)
            if data.nbytes != size:
                raise ValueError(f"features of sequence {i}: {data.nbytes} bytes, expected {size}")
            os.pwrite(self.file.fileno(), data.tobytes(), start)
            self.filled[int(i)] = True
        self.dtype = values[0].dtype if values else self.dtype

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "filled": int(self.filled.sum())}

    def save(self) -> None:
        """Persist which sequences are filled (and their dtype), so later runs start from a full cache."""
        self.file.flush()
        tmp = self.folder / "filled.tmp.npy"
        np.save(tmp, self.filled)
        os.replace(tmp, self.filled_path)
        self.meta_path.write_text(json.dumps({"dtype": str(self.dtype).removeprefix("torch.")}))


def sequence_ids(pair_index: Tensor) -> np.ndarray:
    """Sequence numbers of a batch in its `(2B, ...)` order: chosen 2j for every pair j, then rejected 2j + 1."""
    j = pair_index.cpu().numpy()
    return np.concatenate([2 * j, 2 * j + 1])


class TrunkCache:
    """A model's frozen trunk with a `FeatureCache` per split: scores a batch from stored features
    when all its sequences have them, else by a full pass that stores them."""

    def __init__(self, trunk: FrozenTrunk, caches: dict[str, FeatureCache]):
        self.trunk, self.caches = trunk, caches
        self.block_outputs: dict[int, int | None] = {}  # block -> its output tuple's length (None: a bare tensor)

    def outputs(self, model: Any, batch: dict[str, Tensor], split: str) -> Tensor:
        """Head outputs `(2B, outputs)` of a batch of `split` through `model` (a RewardModel)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        cache, sequences = self.caches[split], sequence_ids(batch["index"])
        stored = cache.lookup(sequences)
        if self.trunk.n_frozen is None:  # the whole backbone is frozen: the pooled states
            if stored is not None:
                return model.head(torch.from_numpy(np.concatenate(stored)).to(ids.device))
            last = model.last_hidden(ids, mask)
            cache.store(sequences, [last[k : k + 1] for k in range(len(sequences))])
            return model.head(last)
        blocks = model.backbone.get_submodule(self.trunk.blocks)
        if stored is not None and self.block_outputs:  # the frozen blocks' output, placed at each real token
            # (the first batch of a process runs in full, to learn the blocks' output structure)
            features = torch.zeros(*ids.shape, cache.hidden, dtype=cache.dtype, device=ids.device)
            for k, values in enumerate(stored):
                features[k, mask[k].bool()] = torch.from_numpy(values).to(ids.device, cache.dtype)
            with self._skip_blocks(blocks, features):
                return model.outputs(ids, mask)
        captured: list[Tensor] = []
        with self._capture(blocks, captured):
            outputs = model.outputs(ids, mask)
        cache.store(sequences, [captured[0][k][mask[k].bool()] for k in range(len(sequences))])
        return outputs

    @contextmanager
    def _capture(self, blocks: nn.ModuleList, store: list[Tensor]) -> Iterator[None]:
        """Record the last frozen block's output, and the structure of every frozen block's output."""
        last = self.trunk.n_frozen - 1

        def hook(i: int) -> Callable[..., None]:
            def record(module: nn.Module, args: Any, output: Any) -> None:
                self.block_outputs[i] = None if isinstance(output, Tensor) else len(output)
                if i == last:
                    store.append(output if isinstance(output, Tensor) else output[0])

            return record

        handles = [blocks[i].register_forward_hook(hook(i)) for i in range(self.trunk.n_frozen)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def _skip_blocks(self, blocks: nn.ModuleList, features: Tensor) -> Iterator[None]:
        """Run the backbone without its frozen blocks: they return their input unchanged, except the
        last, which returns the stored `features` (in the output structure it had)."""
        n = self.trunk.n_frozen
        originals = {i: blocks[i].forward for i in range(n)}

        def replace(i: int) -> Callable[..., Any]:
            def forward(*args: Any, **kwargs: Any) -> Any:
                out = features if i == n - 1 else (args[0] if args else kwargs["hidden_states"])
                size = self.block_outputs[i]
                return out if size is None else (out,) + (None,) * (size - 1)

            return forward

        try:
            for i in originals:
                blocks[i].forward = replace(i)
            yield
        finally:
            for i, forward in originals.items():
                blocks[i].forward = forward


def active_dropout(modules: list[nn.Module]) -> list[str]:
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


def open_trunk_cache(
    backbone: nn.Module,
    trunk: FrozenTrunk,
    trunk_modules: list[nn.Module],
    splits: dict[str, tuple[str, np.ndarray]],
    folder: Path,
    precision: str,
    pooling: str,
) -> TrunkCache | None:
    """A `TrunkCache` over `splits` (name -> (tokenized split's key, every sequence's length)), or None
    when the frozen part is random (dropout active), so its features could not be reused."""
    noisy = active_dropout(trunk_modules)
    if noisy:
        log.info("feature cache off: dropout is active in the frozen part (%s)", ", ".join(sorted(set(noisy))))
        return None
    frozen = {id(p) for m in trunk_modules for p in m.parameters(recurse=False)}
    digest = weights_digest(backbone, lambda n: id(backbone.get_parameter(n)) in frozen)
    hidden = backbone.config.get_text_config().hidden_size
    caches = {}
    for split, (key, lengths) in splits.items():
        identity = json.dumps(
            {"data": key, "trunk": vars(trunk), "weights": digest, "precision": precision, "pooling": pooling}
        )
        name = f"{key}-{hashlib.sha256(identity.encode()).hexdigest()[:20]}"
        caches[split] = FeatureCache(folder / name, lengths, hidden, per_token=trunk.n_frozen is not None)
    log.info("feature cache on for the frozen trunk (%s): %s", trunk, folder)
    return TrunkCache(trunk, caches)
