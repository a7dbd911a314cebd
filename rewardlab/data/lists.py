"""Lists: a split tokenized as whole groups (a prompt and all its responses, with their scores), for losses
that read every response of a prompt at once (`loss=plackett_luce`) or each response with its ratings
(`loss=regression`). A pairs split becomes groups of two (chosen scored 1, rejected 0; a tie 0 and 0), so
listwise losses train on pairs too. Validation and test stay pairs: every loss is measured on the same pairs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from array import array
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from rewardlab.data.cache import (
    PairDataset,
    Settings,
    bad_row_line,
    checked_rows,
    folder_aside,
    make_formatter,
    read_split_groups,
    skipped_tie,
    split_kind,
)
from rewardlab.data.formatting import truncate
from rewardlab.data.groups import Group
from rewardlab.data.rows import BadRow, DataError
from rewardlab.data.sources import source_parts

log = logging.getLogger(__name__)

Item = tuple[int, Group | BadRow]


def _pair_groups(parts: list, split: str, s: Settings, counts: Counter, bad_rows: list[str]) -> tuple[bool, list[Item]]:
    """A pairs split as groups of two, in reading order; tie pairs with `ties=skip` dropped and listed, as the
    pairs cache does."""
    _, chat, _, rows = checked_rows(parts, s, counts)
    items: list[Item] = []
    for index, where, row, pair in rows:
        if isinstance(pair, BadRow):
            items.append((index, pair))
        elif pair.tie and s.ties == "skip":
            counts["dropped:tie"] += 1
            bad_rows.append(bad_row_line(split, "dropped", skipped_tie(where, row)))
        else:
            scores = [0.0, 0.0] if pair.tie else [1.0, 0.0]
            group = Group(
                pair.prompt, [pair.chosen, pair.rejected], scores, None, [where] * 2, [index] * 2, pair.subset
            )
            items.append((index, group))
    return chat, items


def _without_copies(group: Group, candidates: list, n_attributes: int, max_length: int) -> tuple[list, list[BadRow]]:
    """A group's truncated responses less those whose tokens another's equal: one input with two labels
    (scores, or ratings when fitted) loses every copy; with one label, the first copy stays."""
    tokens = [tuple(ids) for _, ids, *_ in candidates]
    copies = defaultdict(list)
    for (k, *_), key in zip(candidates, tokens):
        copies[key].append(k)

    def label(k: int) -> tuple:
        return (group.scores[k], *(group.attributes[k] if n_attributes else ()))

    kept, dropped = [], []
    for candidate, key in zip(candidates, tokens):
        k, same = candidate[0], copies[key]
        agree = len({label(j) for j in same}) == 1
        if len(same) == 1 or (agree and k == same[0]):
            kept.append(candidate)
            continue
        other = next(j for j in same if j != k)
        at = f"response {other}" if group.rows[other] == group.rows[k] else f"the response of {group.where[other]}"
        why = f"identical to {at} once truncated to max_length={max_length}" + ("" if agree else ", scored otherwise")
        dropped.append(BadRow(group.where[k], None, "identical_after_truncation", why, group.responses[k]))
    return kept, dropped


def build_list_cache(spec: str, split: str, tokenizer: PreTrainedTokenizerBase, s: Settings, out: Path) -> None:
    """Read, check, tokenize and truncate one split's groups into `out` (written aside and renamed, like the
    pairs cache). Each response is truncated on its own (prompt first, from the left); a response longer
    than `max_length` with `truncation=drop` is dropped from its group, and counted."""
    counts: Counter[str] = Counter()
    lengths, prompt_lengths, rows, offsets = array("i"), array("i"), array("q"), array("q", [0])
    scores, targets = array("f"), array("f")
    parts = source_parts(spec, split)
    kind = split_kind(parts, s)
    bad_rows: list[str] = []
    if kind == "pairs":
        chat, items = _pair_groups(parts, split, s, counts, bad_rows)
    else:
        items = read_split_groups(parts, kind, s, counts)
        chat = any(isinstance(g, Group) and isinstance(g.prompt, list) for _, g in items)
    formatter = make_formatter(tokenizer, s, "conversational" if chat else "explicit")
    n_attributes = len(s.attributes) if kind == "ratings" else 0
    with folder_aside(out) as tmp:
        with open(tmp / "ids.bin", "wb") as ids_file:
            for _, item in items:
                if isinstance(item, BadRow):
                    if s.on_bad_row == "error":
                        raise DataError(f"{item.message()} (data.on_bad_row=skip skips such rows)")
                    counts[f"skipped:{item.code}"] += 1
                    bad_rows.append(bad_row_line(split, "skipped", item))
                    continue
                encoded = formatter.encode_items([(item.prompt, r) for r in item.responses])
                candidates = []
                for k, enc in enumerate(encoded):
                    problem = enc if isinstance(enc, str) else None
                    if problem is None and len(enc.ids) > s.max_length and s.truncation == "drop":
                        problem = f"longer than max_length={s.max_length} (data.truncation=drop)"
                    if problem is not None:
                        if s.on_bad_row == "error" and isinstance(enc, str):
                            raise DataError(f"{item.where[k]}: {problem} (data.on_bad_row=skip skips such rows)")
                        code = "special_token" if isinstance(enc, str) else "too_long"
                        counts[f"dropped:{code}"] += 1
                        dropped = BadRow(item.where[k], None, code, problem, item.responses[k])
                        bad_rows.append(bad_row_line(split, "dropped", dropped))
                        continue
                    candidates.append((k, *truncate(enc.ids, enc.ids, enc.n_prompt, formatter.n_protected,
                                                    s.max_length)))  # fmt: skip
                candidates, copies = _without_copies(item, candidates, n_attributes, s.max_length)
                for dropped in copies:
                    counts["dropped:identical_after_truncation"] += 1
                    bad_rows.append(bad_row_line(split, "dropped", dropped))
                kept = 0
                for k, ids, _, cut, n_prompt in candidates:
                    if cut:
                        counts[f"truncated:{cut}"] += 1
                    ids_file.write(np.asarray(ids, dtype=np.int32).tobytes())
                    lengths.append(len(ids))
                    prompt_lengths.append(min(n_prompt, len(ids)))
                    rows.append(item.rows[k])
                    scores.append(item.scores[k])
                    targets.extend(item.attributes[k] if n_attributes else [])
                    kept += 1
                counts["used"] += kept
                offsets.append(offsets[-1] + kept)
        for name, values, dtype in (
            ("lengths", lengths, np.int32),
            ("prompt_lengths", prompt_lengths, np.int32),
            ("row", rows, np.int64),
            ("offsets", offsets, np.int64),
            ("scores", scores, np.float32),
        ):
            np.save(tmp / f"{name}.npy", np.frombuffer(values, dtype=dtype))
        np.save(tmp / "targets.npy", np.frombuffer(targets, dtype=np.float32).reshape(len(lengths), n_attributes))
        (tmp / "bad_rows.jsonl").write_text("".join(bad_rows), encoding="utf-8")
        meta = {"source": spec, "split": split, "kind": kind, "format": formatter.style, "counts": dict(counts),
                "attributes": list(s.attributes) if n_attributes else []}  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def list_summary(meta: dict[str, Any], groups: int, responses: int) -> str:
    """One line for a split read as groups: rows read, the prompts and responses used (those of groups large
    enough for the loss), truncated, dropped, skipped."""
    c = meta["counts"]

    def total(prefix: str) -> str:
        found = {k.split(":", 1)[1]: v for k, v in c.items() if k.startswith(prefix + ":")}
        return f"{sum(found.values())} ({', '.join(f'{v} {k}' for k, v in sorted(found.items())) or 'none'})"

    return (
        f"data {meta['split']} (as lists): {c.get('read', 0)} {meta['kind']} rows read from {meta['source']}, "
        f"{groups} prompts with {responses} responses used; {total('truncated')} truncated, "
        f"{total('dropped')} dropped, "
        f"{total('skipped')} bad rows skipped [format {meta['format']}]"
    )


class ListDataset(Dataset):
    """Groups served from a list cache folder: the groups with at least `min_size` responses."""

    def __init__(self, folder: Path, min_size: int):
        self.folder, self.min_size = folder, min_size
        self.meta = json.loads((folder / "meta.json").read_text())
        self.seq_lengths = np.load(folder / "lengths.npy")
        self.prompt_lengths = np.load(folder / "prompt_lengths.npy")
        self.group_offsets = np.load(folder / "offsets.npy")
        self.scores = np.load(folder / "scores.npy")
        self.targets = np.load(folder / "targets.npy")
        self.row = np.load(folder / "row.npy")
        self.seq_offsets = np.concatenate([[0], np.cumsum(self.seq_lengths, dtype=np.int64)])
        size = int(self.seq_offsets[-1])
        self.ids = np.memmap(folder / "ids.bin", dtype=np.int32, mode="r") if size else np.zeros(0, np.int32)
        sizes = np.diff(self.group_offsets)
        self.index = np.flatnonzero(sizes >= min_size)
        self.sizes = sizes[self.index]
        self.lengths = np.array(
            [self.seq_lengths[self.group_offsets[g] : self.group_offsets[g + 1]].max() for g in self.index],
            dtype=np.int64,
        )

    def log_summary(self, batch_size: int | None) -> None:
        """The summary line; the prompts left out for too few responses; for training (`batch_size`), those
        that run as a batch larger than the sequences of `batch_size` pairs (a group is never split)."""
        split = self.meta["split"]
        log.info(list_summary(self.meta, len(self), int(self.sizes.sum())))
        if short := len(self.group_offsets) - 1 - len(self):
            log.info("data %s: %d prompts left out, with fewer than %d responses", split, short, self.min_size)
        if batch_size and (big := int((self.sizes > 2 * batch_size).sum())):
            log.warning("data %s: %d prompts hold more than 2 × data.batch_size = %d responses (up to %d); each runs "
                        "as one batch of all its responses (if memory runs short: lower data.max_length, or filter "
                        "such prompts)", split, big, 2 * batch_size, self.sizes.max())  # fmt: skip

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        g = int(self.index[i])
        first, last = self.group_offsets[g], self.group_offsets[g + 1]
        o = self.seq_offsets
        return {
            "sequences": [self.ids[o[n] : o[n + 1]] for n in range(first, last)],
            "prompt_tokens": self.prompt_lengths[first:last].tolist(),
            "scores": self.scores[first:last],
            "targets": self.targets[first:last],
            "index": g,
        }


def _digest(ids: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(ids).tobytes(), digest_size=8).digest()


def shared_pairs(held_out: PairDataset, train: PairDataset | ListDataset) -> int:
    """How many held-out pairs are also training pairs: the same tokens; for training groups, pairs both of
    whose sequences are training sequences."""
    if isinstance(train, PairDataset):
        seen = set(train.pair_hash[train.index].tolist())
        return sum(h in seen for h in held_out.pair_hash[held_out.index].tolist())
    o = train.seq_offsets
    seen = {_digest(train.ids[o[n] : o[n + 1]]) for n in range(len(train.seq_lengths))}
    h = held_out.offsets
    return sum(
        _digest(held_out.ids[h[2 * j] : h[2 * j + 1]]) in seen
        and _digest(held_out.ids[h[2 * j + 1] : h[2 * j + 2]]) in seen
        for j in held_out.index
    )
