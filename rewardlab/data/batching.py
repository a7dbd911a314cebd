"""Batching: chosen and rejected stacked into one `(2B, L)` batch, and a sampler that groups pairs of
similar length (little padding) and shards every batch across devices.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from rewardlab.data.rows import DataError


def pad_sequences(
    seqs: list[Any], pad_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id sequences as one `(N, L)` batch padded to the longest, and its attention mask."""
    width = max(len(s) for s in seqs)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for k, s in enumerate(seqs):
        span = slice(0, len(s)) if padding_side == "right" else slice(width - len(s), width)
        input_ids[k, span] = torch.from_numpy(np.asarray(s, dtype=np.int64))
        attention_mask[k, span] = 1
    return input_ids, attention_mask


def length_chunks(lengths: np.ndarray, max_chunks: int, overhead_tokens: int) -> list[np.ndarray]:
    """Split sequences into at most `max_chunks` groups of similar length (contiguous in length
    order) that minimise the tokens processed: each group padded to its own longest, plus
    `overhead_tokens` for every extra forward pass. One group when splitting does not pay."""
    order = np.argsort(lengths, kind="stable")
    ranked = lengths[order]
    n = len(ranked)
    # best[k][i]: least cost of the first i sequences in k groups; cut[k][i]: where the last group starts
    best = np.full((max_chunks + 1, n + 1), np.inf)
    cut = np.zeros((max_chunks + 1, n + 1), dtype=int)
    best[0][0] = 0
    for k in range(1, max_chunks + 1):
        for i in range(k, n + 1):
            starts = np.arange(k - 1, i)
            costs = best[k - 1][starts] + (i - starts) * ranked[i - 1] + overhead_tokens
            j = int(np.argmin(costs))
            best[k][i], cut[k][i] = costs[j], starts[j]
    k = int(np.argmin(best[1:, n])) + 1
    groups, end = [], n
    while k:
        start = cut[k][end]
        groups.append(order[start:end])
        end, k = start, k - 1
    return groups[::-1]


@dataclass
class PairCollator:
    """Stacks chosen then rejected into one `(2B, L)` batch, padded to the longest sequence in it.

    With `max_chunks` > 1 the batch also names groups of similar length (`chunks`: row indices) that
    the model runs as separate passes, each padded only to its own longest sequence: chosen and
    rejected often differ in length, so one padded block would spend much of its work on padding.
    `padded_tokens` counts the tokens the passes process; `response_tokens` each sequence's tokens after
    its prompt (an item without `prompt_tokens` counts all of them)."""

    pad_id: int
    padding_side: str
    pad_to_multiple_of: int | None
    max_chunks: int
    chunk_overhead_tokens: int

    def sequences(self, seqs: list[Any], prompt_tokens: list[int]) -> dict[str, Any]:
        """The padded batch of `seqs` with its length chunks, and each one's response tokens."""
        input_ids, attention_mask = pad_sequences(seqs, self.pad_id, self.padding_side, self.pad_to_multiple_of)
        lengths = np.array([len(s) for s in seqs])
        chunks = length_chunks(lengths, self.max_chunks, self.chunk_overhead_tokens) if self.max_chunks > 1 else []
        widths = [int(lengths[c].max()) for c in chunks] if len(chunks) > 1 else [input_ids.shape[1]]
        if self.pad_to_multiple_of:
            widths = [-(-w // self.pad_to_multiple_of) * self.pad_to_multiple_of for w in widths]
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            # response tokens of each sequence (its length after the prompt), for length metrics and ODIN
            "response_tokens": torch.from_numpy(lengths - np.asarray(prompt_tokens, dtype=lengths.dtype)),
            "padded_tokens": sum(w * len(c) for w, c in zip(widths, chunks)) if len(chunks) > 1 else input_ids.numel(),
        }
        if len(chunks) > 1:
            batch["chunks"] = [torch.from_numpy(c) for c in chunks]
            batch["chunk_widths"] = widths
        return batch

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        seqs = [it["chosen"] for it in items] + [it["rejected"] for it in items]
        batch = self.sequences(seqs, [it.get("prompt_tokens", 0) for it in items] * 2)
        batch["margin"] = torch.tensor([it["margin"] for it in items], dtype=torch.float32)
        batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
        if any(it.get("tie") for it in items):
            batch["tie"] = torch.tensor([it["tie"] for it in items], dtype=torch.bool)
        return batch


@dataclass
class ListCollator(PairCollator):
    """Every response of a batch's groups in one `(N, L)` batch (grouped by length into passes like pairs):
    `group` `(N,)` says which of the batch's groups each belongs to, `scores` `(N,)` its score in its group,
    `targets` `(N, attributes)` its ratings; `index` `(G,)` the groups' cache indices."""

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        seqs = [s for it in items for s in it["sequences"]]
        batch = self.sequences(seqs, [n for it in items for n in it["prompt_tokens"]])
        sizes = [len(it["sequences"]) for it in items]
        batch["group"] = torch.repeat_interleave(torch.arange(len(items)), torch.tensor(sizes))
        batch["scores"] = torch.from_numpy(np.concatenate([it["scores"] for it in items])).float()
        batch["targets"] = torch.from_numpy(np.concatenate([it["targets"] for it in items])).float()
        batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
        return batch


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of `batch_size` pairs; each rank of `world_size` gets its share of every batch.

    Training (`shuffle`): shuffle, cut into groups of `group_batches` batches, sort each group by
    length so a batch holds similar lengths (little padding), then shuffle the batch order.
    Evaluation: sorted by length, longest first, so an out-of-memory shows on the first batch.
    With `max_tokens` (data.max_tokens_per_batch, data.eval_max_tokens), a batch holds at most that
    many padded tokens: fewer pairs when they are long, which bounds memory.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        batch_size: int,
        shuffle: bool,
        group_by_length: bool,
        group_batches: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        key: str = "data.batch_size",
        max_tokens: int | None = None,
        sizes: np.ndarray | None = None,
    ):
        if batch_size % world_size:
            raise DataError(
                f"{key}={batch_size} must divide by the world size {world_size} (pairs are split evenly across devices)"
            )
        self.lengths, self.batch_size, self.shuffle = lengths, batch_size, shuffle
        self.group_by_length, self.group_batches, self.seed = group_by_length, group_batches, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        self.max_tokens, self.sizes = max_tokens, sizes
        self.resume_at: tuple[int, int] | None = None  # (epoch, batches already trained in it)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[np.ndarray]:
        n = len(self.lengths)
        if not self.shuffle:
            return self._cut(np.argsort(-self.lengths, kind="stable"))
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n)
        if self.group_by_length:
            g = self.batch_size * self.group_batches
            order = (
                np.concatenate(
                    [c[np.argsort(-self.lengths[c], kind="stable")] for c in np.split(order, range(g, n, g))]
                )
                if n
                else order
            )
        batches = self._cut(order)
        return [batches[i] for i in rng.permutation(len(batches))]

    def _cut(self, order: np.ndarray) -> list[np.ndarray]:
        """Consecutive batches of `batch_size` pairs; with `max_tokens`, a batch ends before the pair
        that would take it over the budget (2 sequences × pairs × its longest), keeping at least one
        pair per device and a multiple of the world size. Groups (`sizes`: sequences per item) fill a
        batch up to the sequences of `batch_size` pairs (2 × batch_size) instead."""
        b, n = self.batch_size, len(order)
        if not self.max_tokens and self.sizes is None:
            return [order[i : i + b] for i in range(0, n, b)]
        sizes = np.full(len(self.lengths), 2) if self.sizes is None else self.sizes
        batches, i = [], 0
        while i < n:
            take, longest, seqs = 0, 0, 0
            while i + take < n and (take < b or self.sizes is not None):
                item = order[i + take]
                longer, more = max(longest, int(self.lengths[item]), 1), seqs + int(sizes[item])
                over = bool(self.max_tokens) and more * longer > self.max_tokens
                if take >= self.world_size and (over or (self.sizes is not None and more > 2 * b)):
                    break
                take, longest, seqs = take + 1, longer, more
            if take > self.world_size:
                take = take // self.world_size * self.world_size
            batches.append(order[i : i + take])
            i += take
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches()
        if self.resume_at is not None and self.resume_at[0] == self.epoch:
            batches = batches[self.resume_at[1] :]  # the batches after those trained before the interruption
        self.resume_at = None
        for batch in batches:
            share = batch[self.rank :: self.world_size]
            if len(share) == 0:  # a last batch smaller than the world: this rank repeats one pair
                share = batch[-1:]
            yield share.tolist()

    def __len__(self) -> int:
        if not self.max_tokens and self.sizes is None:
            return -(-len(self.lengths) // self.batch_size)
        return len(self.batches())  # this epoch's: a token budget cuts each epoch's order its own way
