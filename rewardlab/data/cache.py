"""The tokenized cache: read, check, format and truncate a split once, and keep its token ids in a
memory-mapped folder keyed by the data's content, the tokenizer and the settings, so a second run
on the same data does not tokenize again. `PairDataset` serves pairs from such a folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from rewardlab.data.formatting import Formatter, resolve_format, truncate
from rewardlab.data.groups import Group, decide_kind, group_pairs, read_groups
from rewardlab.data.rows import BadRow, DataError, Pair, check_row, decide_schema, split_schema
from rewardlab.data.sources import Part, chunks, source_parts

CACHE_VERSION = "6"


@dataclass
class Settings:
    """Everything that changes the tokenized result, hashed into the cache key."""

    schema: str
    format: str
    chat_template: str | None
    columns: dict[str, str]
    max_length: int
    truncation: str
    on_bad_row: str
    special_tokens_in_text: str
    ties: str  # keep or skip tie pairs
    pairs: str  # from rankings and ratings: all or adjacent
    min_gap: float  # and only where the scores differ by at least this much
    attributes: dict[str, float]  # ratings' attributes and their weights in the combined score


@contextmanager
def folder_aside(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out`, renamed to `out` when the block completes: concurrent jobs of a sweep
    never see half a cache (one that loses the race to another finds `out` there and keeps it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        yield tmp
        os.rename(tmp, out)
    except OSError:
        if not out.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; cleans up after an error


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of what decides token ids: vocabulary, merges, normalisation, special tokens, template.

    The backend's truncation and padding settings are left out: transformers resets them on the
    first call, which would otherwise change the key between two reads of the same cache.
    """
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(
        json.dumps(
            [type(tokenizer).__name__, tokenizer.special_tokens_map, tokenizer.chat_template],
            sort_keys=True,
            default=str,
        ).encode()
    )
    return h.hexdigest()


def pair_hash(ids: bytes, n_chosen: int) -> int:
    """A 64-bit fingerprint of a pair's token ids, to find pairs shared between splits."""
    digest = hashlib.blake2b(ids, digest_size=8, key=n_chosen.to_bytes(4, "little")).digest()
    return int.from_bytes(digest, "little", signed=True)


def make_formatter(tokenizer: PreTrainedTokenizerBase, s: Settings, schema: str) -> Formatter:
    """The split's formatter: the format `auto` resolves to for this schema, and the settings."""
    style = resolve_format(s.format, schema, tokenizer, s.chat_template)
    return Formatter(tokenizer, style, s.chat_template, s.max_length, s.special_tokens_in_text)


Checked = tuple[int, str, Any, Pair | BadRow]  # row index, where, the raw row, the pair or why not


def _counted(part: Part, counts: Counter) -> Iterator[tuple[str, Any]]:
    """A part's rows with blank lines counted and left out (not rows: they never stop training)."""
    for where, row in part.rows():
        if isinstance(row, BadRow) and row.code == "blank_line":
            counts["blank_lines"] += 1
            continue
        counts["read"] += 1
        yield where, row


def split_kind(parts: list[Part], s: Settings) -> str:
    """What a split's files hold (pairs, rankings or ratings), decided per file from all its rows; one split
    holds one kind."""
    kinds = {p.name: decide_kind((r for _, r in p.rows()), s.columns, p.name) for p in parts}
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"{name} holds {kind}" for name, kind in kinds.items())
        raise DataError(f"the files of one split must hold one kind of row: {listed}")
    return next(iter(kinds.values()), "pairs")


def read_split_groups(parts: list[Part], kind: str, s: Settings, counts: Counter) -> list[tuple[int, Group | BadRow]]:
    """Every group (or bad row) of a rankings or ratings split, with its row index in reading order: the
    files of a folder read as one (a prompt's ratings may be in several of them)."""
    rows = (row for part in parts for row in _counted(part, counts))
    return list(read_groups(rows, kind, s.columns, s.attributes))


def checked_rows(parts: list[Part], s: Settings, counts: Counter) -> tuple[str, bool, str, Iterator[Checked]]:
    """The split's kind, whether it is conversational, its schema, and each row checked: a pair file's rows
    one by one; a rankings or ratings file's groups as the pairs `group_pairs` makes of them (`made`)."""
    kind = split_kind(parts, s)
    if kind == "pairs":
        choices = [decide_schema((r for _, r in p.rows()), s.columns, s.schema, p.name) for p in parts]

        def pair_rows() -> Iterator[Checked]:
            rows = (
                (where, row, choice) for part, choice in zip(parts, choices) for where, row in _counted(part, counts)
            )
            for index, (where, row, choice) in enumerate(rows):
                yield index, where, row, check_row(row, where, choice, s.columns)

        chat = any(c.schema == "conversational" for c in choices)
        return kind, chat, split_schema(choices), pair_rows()
    items = read_split_groups(parts, kind, s, counts)
    chat = any(isinstance(g, Group) and isinstance(g.prompt, list) for _, g in items)

    def group_rows() -> Iterator[Checked]:
        for index, item in items:
            if isinstance(item, BadRow):
                yield index, item.where, item.row, item
                continue
            for pair, where, row_index in group_pairs(item, s.pairs, s.min_gap, s.ties, counts):
                counts["made"] += 1
                row = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
                yield row_index, where, row, pair

    return kind, chat, "conversational" if chat else "explicit", group_rows()


def bad_row_line(split: str, how: str, b: BadRow) -> str:
    """One line of a cache's `bad_rows.jsonl`: a row `how` (skipped or dropped), where, which field and why."""
    record = {"split": split, "kind": how, "where": b.where, "field": b.field, "code": b.code, "reason": b.reason,
              "row": b.row}  # fmt: skip
    return json.dumps(record, default=str, ensure_ascii=False) + "\n"


def skipped_tie(where: str, row: Any) -> BadRow:
    """A tie pair `data.ties=skip` drops, as `bad_rows.jsonl` lists it (pairs and list caches alike)."""
    return BadRow(where, None, "tie", "a tie (data.ties=skip)", row)


def build_cache(spec: str, split: str, tokenizer: PreTrainedTokenizerBase, s: Settings, out: Path) -> None:
    """Read, check, tokenize and truncate one split into `out`, streaming in chunks so memory does
    not grow with the dataset. Written to a temporary folder and renamed, so concurrent jobs of a
    sweep never see half a cache. The settings were checked by the datamodule."""
    counts: Counter[str] = Counter()
    lengths, prompt_lengths, rows_used, subsets = array("i"), array("i"), array("q"), array("i")
    margins, pair_hashes, ties = array("f"), array("q"), array("b")
    subset_codes: dict[str, int] = {}
    keys: list[str] = []
    schema = formatter = kind = None
    with folder_aside(out) as tmp:
        with open(tmp / "ids.bin", "wb") as ids_file, open(tmp / "bad_rows.jsonl", "w", encoding="utf-8") as bad:

            def reject(b: BadRow, how: str) -> None:
                counts[f"{how}:{b.code}"] += 1
                bad.write(bad_row_line(split, how, b))

            parts = source_parts(spec, split)  # each file's kind and schema from all its rows: a first pass
            kind, chat, schema, rows = checked_rows(parts, s, counts)
            formatter = make_formatter(tokenizer, s, "conversational" if chat else schema)
            for chunk in chunks(rows):
                good: list[tuple[int, str, Any, Pair]] = []
                for row_index, where, row, result in chunk:
                    if isinstance(result, BadRow):
                        if s.on_bad_row == "error":
                            raise DataError(
                                f"{result.message()} (data.on_bad_row=skip skips such rows and "
                                "lists them in bad_rows.jsonl)"
                            )
                        reject(result, "skipped")
                    elif result.tie and s.ties == "skip":
                        reject(skipped_tie(where, row), "dropped")
                    else:
                        good.append((row_index, where, row, result))
                if not good:
                    continue
                encoded = formatter.encode_items(
                    [(p.prompt, side) for *_, p in good for side in (p.chosen, p.rejected)]
                )
                for k, (index, where, row, p) in enumerate(good):
                    chosen, rejected = encoded[2 * k], encoded[2 * k + 1]
                    if isinstance(chosen, str) or isinstance(rejected, str):
                        field = s.columns["chosen" if isinstance(chosen, str) else "rejected"]
                        bad_row = BadRow(
                            where, field, "special_token", chosen if isinstance(chosen, str) else rejected, row
                        )
                        if s.on_bad_row == "error":
                            raise DataError(f"{bad_row.message()} (data.on_bad_row=skip skips such rows)")
                        reject(bad_row, "skipped")
                        continue
                    c, r, n_prompt = chosen.ids, rejected.ids, min(chosen.n_prompt, rejected.n_prompt)
                    if max(len(c), len(r)) > s.max_length and s.truncation == "drop":
                        reject(
                            BadRow(
                                where,
                                None,
                                "too_long",
                                f"longer than max_length={s.max_length} (data.truncation=drop)",
                                row,
                            ),
                            "dropped",
                        )
                        continue
                    c, r, cut, n_prompt = truncate(c, r, n_prompt, formatter.n_protected, s.max_length)
                    if c == r:
                        reject(
                            BadRow(
                                where,
                                None,
                                "identical_after_truncation",
                                f"chosen and rejected are identical once truncated to max_length={s.max_length}",
                                row,
                            ),
                            "dropped",
                        )
                        continue
                    if cut:
                        counts[f"truncated:{cut}"] += 1
                    counts["used"] += 1
                    if p.tie:
                        counts["ties"] += 1
                    pair = np.asarray(c + r, dtype=np.int32).tobytes()
                    ids_file.write(pair)
                    pair_hashes.append(pair_hash(pair, len(c)))
                    lengths.extend((len(c), len(r)))
                    prompt_lengths.append(min(n_prompt, len(c), len(r)))
                    margins.append(p.margin)
                    ties.append(p.tie)
                    rows_used.append(index)
                    keys.append(p.key)
                    subsets.append(subset_codes.setdefault(p.subset, len(subset_codes)))
        np.save(tmp / "lengths.npy", np.frombuffer(lengths, dtype=np.int32))
        np.save(tmp / "prompt_lengths.npy", np.frombuffer(prompt_lengths, dtype=np.int32))
        np.save(tmp / "margin.npy", np.frombuffer(margins, dtype=np.float32))
        np.save(tmp / "row.npy", np.frombuffer(rows_used, dtype=np.int64))
        np.save(tmp / "subset.npy", np.frombuffer(subsets, dtype=np.int32))
        np.save(tmp / "pair_hash.npy", np.frombuffer(pair_hashes, dtype=np.int64))
        np.save(tmp / "tie.npy", np.frombuffer(ties, dtype=np.int8).astype(bool))
        if kind != "pairs":  # pairs made of groups: several share a row, so each is named by its responses
            (tmp / "keys.json").write_text(json.dumps(keys))
        meta = {
            "source": spec,
            "split": split,
            "schema": schema,
            "kind": kind,
            "format": formatter and formatter.style,
            "subsets": list(subset_codes),
            "counts": dict(counts),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def summary_line(meta: dict[str, Any]) -> str:
    """One line per split: pairs read (or rows read and the pairs made of them), used, ties, truncated,
    dropped and skipped, with reasons; blank lines."""
    counts = meta["counts"]

    def group(prefix: str) -> tuple[int, str]:
        items = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith(prefix + ":")}
        return sum(items.values()), ", ".join(f"{v} {k}" for k, v in sorted(items.items()))

    truncated, t_why = group("truncated")
    dropped, d_why = group("dropped")
    skipped, s_why = group("skipped")
    kind = meta.get("kind", "pairs")
    read = f"{counts.get('read', 0)} pairs read from {meta['source']}"
    if kind != "pairs":
        not_paired, n_why = group("not_paired")
        read = (
            f"{counts.get('read', 0)} {kind} rows read from {meta['source']}, {counts.get('made', 0)} pairs made of "
            f"them ({not_paired} not made: {n_why or 'none'})"
        )
    return (
        f"data {meta['split']}: {read}, {counts.get('used', 0)} used"
        + (f" ({counts['ties']} of them ties)" if counts.get("ties") else "")
        + "; "
        + f"{truncated} truncated ({t_why or 'none'}), "
        f"{dropped} dropped ({d_why or 'none'}), {skipped} bad rows skipped ({s_why or 'none'})"
        + (f", {counts['blank_lines']} blank lines ignored" if counts.get("blank_lines") else "")
        + f" [schema {meta['schema']}, format {meta['format']}]"
    )


class PairDataset(Dataset):
    """Pairs served from a cache folder; token ids stay memory-mapped on disk."""

    def __init__(self, folder: Path, index: np.ndarray | None = None):
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        seq_lengths = np.load(folder / "lengths.npy")
        self.seq_lengths = seq_lengths.reshape(-1, 2)  # (pairs, 2): chosen, rejected
        self.prompt_lengths = np.load(folder / "prompt_lengths.npy")
        self.offsets = np.concatenate([[0], np.cumsum(seq_lengths, dtype=np.int64)])
        size = int(self.offsets[-1])
        self.ids = np.memmap(folder / "ids.bin", dtype=np.int32, mode="r") if size else np.zeros(0, np.int32)
        self.margin = np.load(folder / "margin.npy")
        self.row = np.load(folder / "row.npy")
        self.subset = np.load(folder / "subset.npy")
        self.pair_hash = np.load(folder / "pair_hash.npy")
        self.tie = np.load(folder / "tie.npy")
        self.keys = json.loads((folder / "keys.json").read_text()) if (folder / "keys.json").exists() else None
        self.index = np.arange(len(self.margin)) if index is None else index
        self.lengths = self.seq_lengths.max(axis=1)[self.index]

    def __len__(self) -> int:
        return len(self.index)

    def pair_keys(self, pairs: Iterable[int]) -> list[str]:
        """What names each pair across runs on the same data: its row (1-based), or for a pair made of a
        group, its responses (`row:i>j` in a ranking, `row>row` for two ratings)."""
        if self.keys is None:
            return [str(int(self.row[j]) + 1) for j in pairs]
        return [self.keys[j] for j in pairs]

    def rows_of(self, pairs: Iterable[int]) -> str:
        """Where pairs (cache indices, as in a batch's `index`) came from, for error messages."""
        rows = sorted(int(self.row[j]) + 1 for j in pairs)
        return f"rows {rows} (1-based, in reading order) of {self.meta['source']} ({self.meta['split']} split)"

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = int(self.index[i])
        o = self.offsets
        return {
            "chosen": self.ids[o[2 * j] : o[2 * j + 1]],
            "rejected": self.ids[o[2 * j + 1] : o[2 * j + 2]],
            "margin": float(self.margin[j]),
            "tie": bool(self.tie[j]),
            "index": j,
            "prompt_tokens": int(self.prompt_lengths[j]),
        }
