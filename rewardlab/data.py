"""Preference data: read, check, format, tokenize (once, cached on disk), batch.

A pair (prompt, chosen, rejected) becomes two token sequences, each `prompt [SEP] response [EOS]`
(or the tokenizer's chat template), which the model scores in one forward pass. The flow:

1. `read_source` yields the raw rows of a file, folder or hub dataset with their location.
2. `check_row` turns a raw row into a `Pair` or a `BadRow` naming the location and the field.
3. `Formatter` renders and tokenizes; `truncate` fits a pair into `max_length`.
4. `build_cache` writes the token ids of a split to a memory-mapped folder keyed by the data,
   the tokenizer and the settings, so a second run on the same data does not tokenize again.
5. `PreferenceDataModule` serves length-grouped, dynamically padded batches from the cache.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
# The datamodule restores the data position itself (PreferenceDataModule.state_dict), which this
# warning of Lightning's, about DataLoaders without state, does not know.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
SCHEMAS = ("explicit", "conversational", "implicit")
FORMATS = ("sep", "chat", "plain")
CACHE_VERSION = "2"
CHUNK_ROWS = 1024


class DataError(ValueError):
    """Bad input found before training; the message names the file, line or row, and the field."""


# --------------------------------------------------------------------------------------------
# 1. Reading


def _utf8_problem(data: bytes) -> tuple[int, str] | None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start, f"not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); expected UTF-8 text"
    return None


def _decode(path: Path, data: bytes) -> str:
    if (problem := _utf8_problem(data)) is not None:
        line = data[: problem[0]].count(b"\n") + 1
        raise DataError(f"{path}:{line}: {problem[1]}")
    return data.decode("utf-8")


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """One row per line; a line that is not UTF-8 or not JSON comes back as a `BadRow`."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}:{n}"
            if (problem := _utf8_problem(raw)) is not None:
                yield where, BadRow(where, None, "not_utf8", problem[1], raw.decode("utf-8", "replace"))
                continue
            line = raw.decode("utf-8")
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, BadRow(where, None, "invalid_json", f"invalid JSON ({e.msg} at column {e.colno})", line)


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    text = _decode(path, path.read_bytes())
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{path} row {i}", row


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(_decode(path, path.read_bytes()), newline=""))
    for row in reader:
        yield f"{path}:{reader.line_num}", row


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    i = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=CHUNK_ROWS):
        for row in batch.to_pylist():
            yield f"{path} row {i}", row
            i += 1


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def _read_file(path: Path) -> Iterator[tuple[str, Any]]:
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{path}: unknown format {path.suffix!r}; expected one of {', '.join(READERS)}, "
            "a folder saved with datasets.save_to_disk, or a hub dataset name"
        )
    yield from reader(path)


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _pick_split(dataset: Any, spec: str, split: str) -> Any:
    """A DatasetDict holds several splits: take the one named in `spec` (`name:split`) or `split`."""
    if not hasattr(dataset, "keys"):
        return dataset
    if split not in dataset:
        raise DataError(f"{spec}: no split {split!r}; it has {sorted(dataset)} (name one as '{spec}:SPLIT')")
    return dataset[split]


def _split_spec(spec: str, default_split: str) -> tuple[str, str]:
    name, sep, split = spec.rpartition(":")
    return (name, split) if sep and name and "/" not in split else (spec, default_split)


def read_source(spec: str, default_split: str) -> Iterator[tuple[str, Any]]:
    """Yield `(location, row)` for every row of a file, a folder of files, a `save_to_disk` folder
    (`folder[:split]`), or (for online users) a hub dataset `name[:split]`."""
    path = Path(spec).expanduser()
    if path.is_file():
        yield from _read_file(path)
        return
    name, split = (spec, default_split) if path.exists() else _split_spec(spec, default_split)
    folder = Path(name).expanduser()
    if folder.is_dir():
        if _is_saved_dataset(folder):
            import datasets

            for i, row in enumerate(_pick_split(datasets.load_from_disk(str(folder)), spec, split)):
                yield f"{folder} row {i}", row
            return
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in READERS)
        if not files:
            raise DataError(
                f"{folder}: folder holds no data files (expected {', '.join(READERS)} files "
                "or a folder saved with datasets.save_to_disk)"
            )
        for file in files:
            yield from _read_file(file)
        return
    if folder.suffix.lower() in READERS or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise DataError(f"{spec}: no such file or folder")
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear message
        raise DataError(
            f"{spec}: not a local file or folder, and loading it as a hub dataset "
            f"(split {split!r}) failed: {type(e).__name__}: {e}"
        ) from e
    for i, row in enumerate(dataset):
        yield f"{spec} row {i}", row


def fingerprint_source(spec: str, default_split: str) -> str:
    """Content hash of local data (so renames and touches keep the cache), or the hub fingerprint."""
    path = Path(spec).expanduser()
    name, split = (spec, default_split) if path.exists() else _split_spec(spec, default_split)
    path = Path(name).expanduser()
    h = hashlib.sha256(split.encode())
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            h.update(str(file.relative_to(path) if file != path else file.name).encode())
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()
    import datasets

    try:
        return datasets.load_dataset(name, split=split)._fingerprint
    except Exception as e:  # noqa: BLE001
        raise DataError(
            f"{spec}: no such file or folder, and not loadable as a hub dataset "
            f"(split {split!r}): {type(e).__name__}: {e}"
        ) from e


# --------------------------------------------------------------------------------------------
# 2. Checking


@dataclass
class Pair:
    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    margin: float
    subset: str


@dataclass
class BadRow:
    """A row that cannot be used: where it is, which field, a short `code` to count by, and why."""

    where: str
    field: str | None
    code: str
    reason: str
    row: Any

    def message(self) -> str:
        field = f" field {self.field!r}:" if self.field else ""
        return f"{self.where}:{field} {self.reason}"


def detect_schema(row: Any, columns: dict[str, str]) -> str:
    """explicit: string prompt/chosen/rejected; conversational: message lists; implicit: no prompt,
    chosen and rejected are full texts sharing the prompt as a prefix."""
    if not isinstance(row, dict):
        return "explicit"
    if isinstance(row.get(columns["chosen"]), list):
        return "conversational"
    return "explicit" if row.get(columns["prompt"]) is not None else "implicit"


def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"


def _messages(value: Any) -> str | None:
    """None if `value` is a non-empty list of {role, content} string messages, else what is wrong."""
    if not isinstance(value, list) or not value:
        return f"expected a non-empty list of messages, got {_describe(value)}"
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return f"message {i}: expected {{'role': str, 'content': str}}, got {_describe(m)}"
    return None


def _common_prefix(a: list | str, b: list | str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _split_implicit(chosen: str, rejected: str) -> int:
    """Where the shared prompt ends: the common prefix, backed off to the last whitespace so both
    responses start at a word boundary."""
    n = _common_prefix(chosen, rejected)
    while n > 0 and not chosen[n - 1].isspace() and not (n < len(chosen) and chosen[n].isspace()):
        n -= 1
    return n


def _margin(value: Any) -> float | str:
    if value is None or value == "":
        return math.nan
    if isinstance(value, bool):
        return f"expected a number, got {_describe(value)}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return f"expected a number, got {_describe(value)}"
    return number if math.isfinite(number) else f"expected a finite number, got {value!r}"


def check_row(row: Any, where: str, schema: str, columns: dict[str, str]) -> Pair | BadRow:
    """Validate one raw row against `schema` and return a `Pair`, or a `BadRow` saying why not."""
    c = columns
    if isinstance(row, BadRow):
        return row
    if not isinstance(row, dict):
        return BadRow(
            where,
            None,
            "not_an_object",
            f"expected an object with fields {c['chosen']!r} and {c['rejected']!r}, got {_describe(row)}",
            row,
        )
    needed = ("prompt", "chosen", "rejected") if schema == "explicit" else ("chosen", "rejected")
    for key in needed:
        if c[key] not in row:
            return BadRow(
                where, c[key], "missing_field", f"missing (this {schema} dataset needs {[c[k] for k in needed]})", row
            )
    margin = _margin(row.get(c["margin"]))
    if isinstance(margin, str):
        return BadRow(where, c["margin"], "bad_margin", margin, row)
    subset = row.get(c["subset"])
    subset = "" if subset is None else str(subset)
    chosen, rejected, prompt = row[c["chosen"]], row[c["rejected"]], row.get(c["prompt"])

    if schema == "conversational":
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if (problem := _messages(value)) is not None:
                return BadRow(where, c[key], "bad_messages", problem, row)
        if prompt is None:
            n = _common_prefix(chosen, rejected)
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
            if not chosen or not rejected:
                side = "chosen" if not chosen else "rejected"
                return BadRow(
                    where,
                    c[side],
                    "empty_response",
                    "no messages left after the prompt shared with the other side",
                    row,
                )
        elif isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        elif (problem := _messages(prompt)) is not None:
            return BadRow(where, c["prompt"], "bad_messages", problem, row)
        if chosen == rejected:
            return BadRow(where, c["rejected"], "identical", "identical to chosen", row)
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if not "".join(m["content"] for m in value).strip():
                return BadRow(where, c[key], "empty_response", "empty response", row)
        return Pair(prompt, chosen, rejected, margin, subset)

    fields = (("chosen", chosen), ("rejected", rejected)) + ((("prompt", prompt),) if schema == "explicit" else ())
    for key, value in fields:
        if not isinstance(value, str):
            return BadRow(where, c[key], "not_a_string", f"expected a string, got {_describe(value)}", row)
    if schema == "implicit":
        n = _split_implicit(chosen, rejected)
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not value.strip():
            return BadRow(where, c[key], "empty_response", "empty response", row)
    if chosen == rejected:
        return BadRow(where, c["rejected"], "identical", "identical to chosen", row)
    return Pair(prompt, chosen, rejected, margin, subset)


# --------------------------------------------------------------------------------------------
# 3. Formatting and truncation


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Batches need a pad id; the reward never reads it (the attention mask says where text ends)."""
    if tokenizer.pad_token is not None:
        return
    fallback = tokenizer.eos_token or tokenizer.unk_token
    if fallback is None:
        raise DataError("the tokenizer has no pad, EOS or UNK token to pad with; add one to the tokenizer")
    tokenizer.pad_token = fallback
    log.info("tokenizer has no pad token: padding with %r (padding is masked, never scored)", fallback)


class Formatter:
    """Renders (prompt, response) as text and tokenizes it exactly as it will be scored.

    `sep`: `{BOS}prompt{SEP}response{EOS}`; `plain`: `{BOS}prompt response{EOS}` with no separator
    added; `chat`: the chat template. `{BOS}` is whatever the tokenizer itself puts first ([CLS],
    <s>, ...); a tokenizer without EOS ends with the special token it appends (BERT's [SEP]).
    Texts are tokenized with `add_special_tokens=False`, so `text` -> ids is reproducible.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, style: str, chat_template: str | None = None):
        if style not in FORMATS:
            raise DataError(f"data.format: unknown {style!r}; expected auto or one of {FORMATS}")
        self.tokenizer, self.style = tokenizer, style
        self.chat_template = chat_template or tokenizer.chat_template
        with_specials = tokenizer("x")["input_ids"]
        bare = tokenizer("x", add_special_tokens=False)["input_ids"]
        start = next((i for i in range(len(with_specials)) if with_specials[i : i + len(bare)] == bare), 0)
        special = set(tokenizer.all_special_ids)
        prefix = [t for t in with_specials[:start] if t in special]
        suffix = [t for t in with_specials[start + len(bare) :] if t in special]
        self.bos = "".join(tokenizer.convert_ids_to_tokens(prefix))
        self.n_protected = len(prefix)
        self.eos = tokenizer.eos_token or "".join(tokenizer.convert_ids_to_tokens(suffix[-1:]))
        if style == "sep" and tokenizer.sep_token is None:
            raise DataError("data.format=sep: the tokenizer has no separator token; use chat or plain")
        if style == "chat" and not self.chat_template:
            raise DataError("data.format=chat: the tokenizer has no chat template; set data.chat_template")
        if style != "chat" and not self.eos:
            raise DataError(f"data.format={style}: the tokenizer has no EOS token and appends none")

    def texts(self, prompt: str | list[dict], response: str | list[dict]) -> tuple[str, str]:
        """Return (prompt part, full text); the full text starts with the prompt part."""
        if self.style == "chat":
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            response = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
            render = self.tokenizer.apply_chat_template
            head = render(prompt, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True)
            full = render(prompt + response, chat_template=self.chat_template, tokenize=False)
            return head[: _common_prefix(head, full)], full
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise DataError(f"data.format={self.style} needs string data; conversational data needs format=chat")
        head = self.bos + prompt + (self.tokenizer.sep_token if self.style == "sep" else "")
        return head, head + response + self.eos

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids in full; `truncate` cuts them to max_length (so no "longer than" warning here)."""
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def resolve_format(style: str, schema: str, tokenizer: PreTrainedTokenizerBase, chat_template: str | None) -> str:
    """auto: the chat template for conversational data; else `prompt [SEP] response [EOS]` where the
    tokenizer has a separator, the chat template where it has one, plain text otherwise."""
    if style != "auto":
        return style
    if schema == "conversational" or (tokenizer.sep_token is None and (chat_template or tokenizer.chat_template)):
        return "chat"
    return "sep" if tokenizer.sep_token is not None else "plain"


def truncate(
    chosen: list[int], rejected: list[int], n_prompt: int, n_protected: int, max_length: int
) -> tuple[list[int], list[int], str, int]:
    """Fit both sides into `max_length`: cut the shared prompt from the left first (by the same
    amount on both sides, keeping the leading BOS/CLS), then the start of a response that is still
    too long, so every response keeps its end and EOS. Returns both sides, the kind of cut ('',
    'prompt' or 'response') and how many prompt tokens are left."""
    over = max(len(chosen), len(rejected)) - max_length
    if over <= 0:
        return chosen, rejected, "", n_prompt
    cut = min(over, max(n_prompt - n_protected, 0))
    head = slice(0, n_protected)
    sides = [s[head] + s[n_protected + cut :] for s in (chosen, rejected)]
    kind = "prompt"
    kept = max(n_prompt - cut, n_protected)
    for i, s in enumerate(sides):
        if len(s) > max_length:
            sides[i] = s[:kept] + s[kept + len(s) - max_length :]
            kind = "response"
    return sides[0], sides[1], kind, kept


# --------------------------------------------------------------------------------------------
# 4. The tokenized cache


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


def _chunks(rows: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def build_cache(spec: str, split: str, tokenizer: PreTrainedTokenizerBase, s: Settings, out: Path) -> None:
    """Read, check, tokenize and truncate one split into `out`, streaming in chunks so memory does
    not grow with the dataset. Written to a temporary folder and renamed, so concurrent jobs of a
    sweep never see half a cache."""
    if s.truncation not in ("truncate", "drop"):
        raise DataError(f"data.truncation: unknown {s.truncation!r}; expected 'truncate' or 'drop'")
    if s.on_bad_row not in ("error", "skip"):
        raise DataError(f"data.on_bad_row: unknown {s.on_bad_row!r}; expected 'error' or 'skip'")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    counts: Counter[str] = Counter()
    lengths, prompt_lengths, rows_used, subsets = array("i"), array("i"), array("q"), array("i")
    margins = array("f")
    subset_codes: dict[str, int] = {}
    schema = formatter = None
    try:
        with open(tmp / "ids.bin", "wb") as ids_file, open(tmp / "bad_rows.jsonl", "w", encoding="utf-8") as bad:

            def reject(b: BadRow, kind: str) -> None:
                counts[f"{kind}:{b.code}"] += 1
                bad.write(
                    json.dumps(
                        {
                            "split": split,
                            "kind": kind,
                            "where": b.where,
                            "field": b.field,
                            "code": b.code,
                            "reason": b.reason,
                            "row": b.row,
                        },
                        default=str,
                        ensure_ascii=False,
                    )
                    + "\n"
                )

            row_index = 0
            for chunk in _chunks(read_source(spec, split), CHUNK_ROWS):
                good: list[tuple[int, str, Any, Pair]] = []
                for where, row in chunk:
                    counts["read"] += 1
                    if schema is None and not isinstance(row, BadRow):
                        schema = detect_schema(row, s.columns) if s.schema == "auto" else s.schema
                        if schema not in SCHEMAS:
                            raise DataError(f"data.schema: unknown {schema!r}; expected auto or one of {SCHEMAS}")
                        formatter = Formatter(
                            tokenizer, resolve_format(s.format, schema, tokenizer, s.chat_template), s.chat_template
                        )
                    result = check_row(row, where, schema or "explicit", s.columns)
                    if isinstance(result, BadRow):
                        if s.on_bad_row == "error":
                            raise DataError(
                                f"{result.message()} (data.on_bad_row=skip skips such rows and "
                                "lists them in bad_rows.jsonl)"
                            )
                        reject(result, "skipped")
                    else:
                        good.append((row_index, where, row, result))
                    row_index += 1
                if not good:
                    continue
                heads, chosen_texts, rejected_texts = [], [], []
                for *_, p in good:
                    head, chosen_text = formatter.texts(p.prompt, p.chosen)
                    heads.append(head)
                    chosen_texts.append(chosen_text)
                    rejected_texts.append(formatter.texts(p.prompt, p.rejected)[1])
                encoded = zip(
                    formatter.encode(chosen_texts), formatter.encode(rejected_texts), map(len, formatter.encode(heads))
                )
                for (index, where, row, p), (c, r, n_prompt) in zip(good, encoded):
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
                    ids_file.write(np.asarray(c + r, dtype=np.int32).tobytes())
                    lengths.extend((len(c), len(r)))
                    prompt_lengths.append(min(n_prompt, len(c), len(r)))
                    margins.append(p.margin)
                    rows_used.append(index)
                    subsets.append(subset_codes.setdefault(p.subset, len(subset_codes)))
        np.save(tmp / "lengths.npy", np.frombuffer(lengths, dtype=np.int32))
        np.save(tmp / "prompt_lengths.npy", np.frombuffer(prompt_lengths, dtype=np.int32))
        np.save(tmp / "margin.npy", np.frombuffer(margins, dtype=np.float32))
        np.save(tmp / "row.npy", np.frombuffer(rows_used, dtype=np.int64))
        np.save(tmp / "subset.npy", np.frombuffer(subsets, dtype=np.int32))
        meta = {
            "source": spec,
            "split": split,
            "schema": schema,
            "format": formatter and formatter.style,
            "subsets": list(subset_codes),
            "counts": dict(counts),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.rename(tmp, out)
    except OSError:
        if not out.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; cleans up after an error


def summary_line(meta: dict[str, Any]) -> str:
    """One line per split: pairs read, used, truncated, dropped and skipped, with reasons."""
    counts = meta["counts"]

    def group(prefix: str) -> tuple[int, str]:
        items = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith(prefix + ":")}
        return sum(items.values()), ", ".join(f"{v} {k}" for k, v in sorted(items.items()))

    truncated, t_why = group("truncated")
    dropped, d_why = group("dropped")
    skipped, s_why = group("skipped")
    return (
        f"data {meta['split']}: {counts.get('read', 0)} pairs read from {meta['source']}, "
        f"{counts.get('used', 0)} used; {truncated} truncated ({t_why or 'none'}), "
        f"{dropped} dropped ({d_why or 'none'}), {skipped} bad rows skipped ({s_why or 'none'}) "
        f"[schema {meta['schema']}, format {meta['format']}]"
    )


# --------------------------------------------------------------------------------------------
# 5. Datasets, batches, and the DataModule


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
        self.index = np.arange(len(self.margin)) if index is None else index
        self.lengths = self.seq_lengths.max(axis=1)[self.index]

    def __len__(self) -> int:
        return len(self.index)

    def describe(self, pairs: Iterable[int]) -> str:
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
            "index": j,
        }


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


@dataclass
class PairCollator:
    """Stacks chosen then rejected into one `(2B, L)` batch, padded to the longest sequence in it."""

    pad_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [it["chosen"] for it in items] + [it["rejected"] for it in items]
        input_ids, attention_mask = pad_sequences(seqs, self.pad_id, self.padding_side, self.pad_to_multiple_of)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "margin": torch.tensor([it["margin"] for it in items], dtype=torch.float32),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        }


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of `batch_size` pairs; each rank of `world_size` gets its share of every batch.

    Training (`shuffle`): shuffle, cut into groups of `group_batches` batches, sort each group by
    length so a batch holds similar lengths (little padding), then shuffle the batch order.
    Evaluation: sorted by length, longest first, so an out-of-memory shows on the first batch;
    with `max_tokens`, a batch holds at most that many padded tokens (fewer pairs when they are
    long), which bounds memory without changing any reward.
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
    ):
        if batch_size % world_size:
            raise DataError(
                f"{key}={batch_size} must divide by the world size {world_size} (pairs are split evenly across devices)"
            )
        self.lengths, self.batch_size, self.shuffle = lengths, batch_size, shuffle
        self.group_by_length, self.group_batches, self.seed = group_by_length, group_batches, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        self.max_tokens = max_tokens
        self.resume_at: tuple[int, int] | None = None  # (epoch, batches already trained in it)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[np.ndarray]:
        n, b = len(self.lengths), self.batch_size
        if not self.shuffle:
            order = np.argsort(-self.lengths, kind="stable")
            batches, i = [], 0
            while i < n:
                take = b
                if self.max_tokens:  # pairs × 2 sequences × the longest (first) length
                    fit = self.max_tokens // (2 * max(int(self.lengths[order[i]]), 1))
                    take = max(self.world_size, min(b, fit // self.world_size * self.world_size))
                batches.append(order[i : i + take])
                i += take
            return batches
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n)
        if self.group_by_length:
            g = b * self.group_batches
            order = (
                np.concatenate(
                    [c[np.argsort(-self.lengths[c], kind="stable")] for c in np.split(order, range(g, n, g))]
                )
                if n
                else order
            )
        batches = [order[i : i + b] for i in range(0, n, b)]
        return [batches[i] for i in rng.permutation(len(batches))]

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
        if self.shuffle or not self.max_tokens:
            return -(-len(self.lengths) // self.batch_size)
        return len(self.batches())


class PreferenceDataModule(L.LightningDataModule):
    """Reads, checks, tokenizes (cached) and batches preference pairs for train/val/test."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        train_file: str | None,
        val_file: str | None,
        test_file: str | None,
        batch_size: int,
        eval_batch_size: int,
        eval_max_tokens: int | None,
        max_length: int,
        truncation: str,
        schema: str,
        format: str,
        chat_template: str | None,
        columns: dict[str, str],
        on_bad_row: str,
        val_fraction: float,
        group_by_length: bool,
        group_batches: int,
        padding_side: str,
        pad_to_multiple_of: int | None,
        num_workers: int,
        cache_dir: str,
        report_dir: str | None,
        seed: int,
    ):
        super().__init__()
        ensure_pad_token(tokenizer)
        if padding_side not in ("left", "right"):
            raise DataError(f"data.padding_side: unknown {padding_side!r}; expected 'left' or 'right'")
        missing = {"prompt", "chosen", "rejected", "margin", "subset"} - set(columns)
        if missing:
            raise DataError(f"data.columns: missing {sorted(missing)}; map each to the column name in your data")
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"data.val_fraction={val_fraction}: expected a number in [0, 1)")
        self.tokenizer = tokenizer
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.settings = Settings(schema, format, chat_template, dict(columns), max_length, truncation, on_bad_row)
        self.batch_size, self.eval_batch_size, self.eval_max_tokens = batch_size, eval_batch_size, eval_max_tokens
        self.val_fraction, self.group_by_length, self.group_batches = val_fraction, group_by_length, group_batches
        self.collator = PairCollator(tokenizer.pad_token_id, padding_side, pad_to_multiple_of)
        self.num_workers, self.seed = num_workers, seed
        self.cache_dir = Path(cache_dir)
        self.report_dir = Path(report_dir) if report_dir else None
        self.datasets: dict[str, PairDataset] = {}
        self.resume: dict[str, int] | None = None  # a checkpoint's data position, until the loader uses it
        self._cache_paths: dict[str, Path] = {}

    def cache_path(self, split: str) -> Path:
        """Where the split's tokens are cached: keyed by the data's content, tokenizer and settings
        (hashed once per split and remembered)."""
        if split not in self._cache_paths:
            self._cache_paths[split] = self._cache_key_path(split)
        return self._cache_paths[split]

    def _cache_key_path(self, split: str) -> Path:
        spec = self.files[split]
        key = hashlib.sha256(
            json.dumps(
                [
                    CACHE_VERSION,
                    fingerprint_source(spec, split),
                    tokenizer_fingerprint(self.tokenizer),
                    vars(self.settings),
                ],
                sort_keys=True,
                default=str,
            ).encode()
        ).hexdigest()[:20]
        return self.cache_dir / f"{split}-{key}"

    def prepare_data(self) -> None:
        """Tokenize every split not yet cached; every split is checked before training starts."""
        for split, spec in self.files.items():
            if spec and not (path := self.cache_path(split)).exists():
                log.info("tokenizing %s split from %s (cached in %s)", split, spec, path)
                build_cache(spec, split, self.tokenizer, self.settings, path)

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit" and not self.files["train"]:
            raise DataError("data.train_file is not set")
        if stage == "fit" and not self.files["val"] and not self.val_fraction:
            raise DataError("no validation data: set data.val_file, or data.val_fraction to hold out part of train")
        if self.datasets:
            return
        for split, spec in self.files.items():
            if spec:
                self.datasets[split] = PairDataset(self.cache_path(split))
        if self.val_fraction and not self.files["val"]:
            train = self.datasets["train"]
            order = np.random.default_rng(self.seed).permutation(len(train))
            n_val = max(1, round(len(train) * self.val_fraction))
            self.datasets["val"] = PairDataset(train.folder, np.sort(order[:n_val]))
            self.datasets["train"] = PairDataset(train.folder, np.sort(order[n_val:]))
            log.info("data val: %d pairs held out of train (data.val_fraction=%s)", n_val, self.val_fraction)
        if self.trainer is None or self.trainer.is_global_zero:
            self.report()
        for split, dataset in self.datasets.items():
            if len(dataset) == 0:
                raise DataError(
                    f"data {split}: no pairs left after checking and truncation ({summary_line(dataset.meta)})"
                )

    def report(self) -> None:
        """Log one summary line per split and copy skipped/dropped rows to the run folder."""
        lines = []
        for split in self.files:
            if split in self.datasets and (self.datasets[split].meta["split"] == split):
                log.info(summary_line(self.datasets[split].meta))
                text = (self.datasets[split].folder / "bad_rows.jsonl").read_text(encoding="utf-8")
                lines += text.split("\n")[:-1]  # not splitlines(): rows may hold U+2028 or U+0085
        if lines and self.report_dir is not None:
            self.report_dir.mkdir(parents=True, exist_ok=True)
            (self.report_dir / "bad_rows.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
            log.info("%d skipped or dropped rows listed in %s", len(lines), self.report_dir / "bad_rows.jsonl")

    def _rank(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        """Training batches are shuffled and length-grouped; evaluation batches sorted by length."""
        rank, world = self._rank()
        dataset = self.datasets[split]
        key, batch_size = (
            ("data.batch_size", self.batch_size) if shuffle else ("data.eval_batch_size", self.eval_batch_size)
        )
        sampler = LengthGroupedBatchSampler(
            dataset.lengths,
            batch_size,
            shuffle,
            self.group_by_length,
            self.group_batches,
            self.seed,
            rank,
            world,
            key,
            max_tokens=None if shuffle else self.eval_max_tokens,
        )
        options = dict(
            batch_sampler=sampler,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # its own generator: starting an iterator draws a seed, which must not move the global one
            # (dropout) and so make a resumed run differ from an uninterrupted one
            generator=torch.Generator().manual_seed(self.seed),
        )
        if shuffle and self.resume is not None:
            self._resume(sampler)
        return DataLoader(dataset, **options)

    def state_dict(self) -> dict[str, int]:
        """The training data position, saved in every checkpoint. Lightning's own route (a stateful
        DataLoader) is not taken: it loads the position only after the loader has been built."""
        if self.trainer is None or "train" not in self.datasets:
            return {}
        return {
            "epoch": self.trainer.current_epoch,
            "batches_trained": self.trainer.fit_loop.epoch_loop.batch_progress.current.processed,
            "batches_per_epoch": -(-len(self.datasets["train"]) // self.batch_size),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Called with a checkpoint's state before the training loader is built."""
        self.resume = state or None

    def _resume(self, sampler: LengthGroupedBatchSampler) -> None:
        """Resuming mid-epoch: that epoch continues with the batches it had not trained yet, in the
        same order, instead of starting over (and training its first batches twice)."""
        state, self.resume = self.resume, None
        if state["batches_per_epoch"] != len(sampler):
            log.warning(
                "resuming: the checkpoint's epoch had %d batches, the data now gives %d; "
                "the interrupted epoch restarts from its first batch",
                state["batches_per_epoch"],
                len(sampler),
            )
            return
        sampler.resume_at = (state["epoch"], state["batches_trained"])
        if 0 < state["batches_trained"] < len(sampler):
            log.info("resuming epoch %d after its first %d batches", state["epoch"], state["batches_trained"])

    def counts(self) -> dict[str, int]:
        """Pairs read, used, truncated, dropped and skipped per split, for the run's results."""
        out: dict[str, int] = {}
        for split, dataset in self.datasets.items():
            out |= {f"data/{split}/{kind}": 0 for kind in ("read", "used", "truncated", "dropped", "skipped")}
            if dataset.meta["split"] != split:  # val held out of train: counted under train
                continue
            for key, n in dataset.meta["counts"].items():
                kind = key.split(":", 1)[0]
                out[f"data/{split}/{kind}"] = out.get(f"data/{split}/{kind}", 0) + n
        return out

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def has_test(self) -> bool:
        return bool(self.files["test"])
