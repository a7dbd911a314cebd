"""Sources: read the raw rows of a file, a folder of files, a `save_to_disk` folder or a hub dataset,
each with its location (`file:line` or `file row i`) so every later message can name it.

Readers stream (a .json list is decoded once) and never crash on what users really have: a UTF-8
byte-order mark, compressed files, numbers or nesting Python cannot hold, records of the wrong
width. What cannot be read comes back as a `BadRow` in the row's place, blank lines included, so
the n-th row read is the n-th row of the file.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
import lzma
import math
import re
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import zstandard

from rewardlab.data.rows import BadRow, DataError, TextRow, Unreadable

CHUNK_ROWS = 1024
BOM = b"\xef\xbb\xbf"
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError)
WHITESPACE = re.compile(r"[ \t\n\r]*")
JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)  # strings and brackets, to skip a value
ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of a non-UTF-8 byte


@dataclass(frozen=True)
class Part:
    """One file (or dataset) of a source. `rows()` reads it from the start on every call, so a first
    pass can decide the file's schema before a second one checks its rows."""

    name: str
    rows: Callable[[], Iterator[tuple[str, Any]]]


def _integer(text: str) -> int | Unreadable:
    try:
        return int(text)
    except ValueError:
        limit = sys.get_int_max_str_digits()
        return Unreadable(text, f"integer of {len(text)} digits; expected at most {limit} digits")


def _float(text: str) -> float | Unreadable:
    value = float(text)
    if math.isfinite(value):
        return value
    return Unreadable(text, f"number {text[:40]} is beyond float range; expected a finite number")


def _constant(name: str) -> Unreadable:
    return Unreadable(name, f"{name} is not a number; expected a finite number")


DECODER = json.JSONDecoder(parse_int=_integer, parse_float=_float, parse_constant=_constant)


def _too_deep(where: str, text: str) -> BadRow:
    return BadRow(where, None, "too_deep", "nested deeper than the JSON parser can follow; expected a flat row", text)


def _parse_line(where: str, line: str) -> Any:
    try:
        return DECODER.decode(line)
    except json.JSONDecodeError as e:
        return BadRow(where, None, "invalid_json", f"invalid JSON ({e.msg} at column {e.colno})", line)
    except RecursionError:
        return _too_deep(where, line)


def _open(path: Path, compression: str) -> IO[bytes]:
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".bz2":
        return bz2.open(path, "rb")
    if compression == ".xz":
        return lzma.open(path, "rb")
    if compression == ".zst":
        return io.BufferedReader(_ZstdFrames(path))
    return open(path, "rb")


class _ZstdFrames(io.RawIOBase):
    """A .zst file's frames, decompressed as they are read; a file that ends inside a frame is an
    error (zstandard's own stream reader stops there quietly, losing the rest of the rows)."""

    def __init__(self, path: Path):
        self.file, self.frame, self.pending = open(path, "rb"), None, b""  # noqa: SIM115 - closed in close()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self.pending:
            data = self.file.read(1 << 16)
            if not data:
                if self.frame is not None and not self.frame.eof:
                    raise zstandard.ZstdError("the file ends inside a compressed frame (truncated?)")
                return 0
            while data:
                if self.frame is None or self.frame.eof:
                    self.frame = zstandard.ZstdDecompressor().decompressobj()
                self.pending += self.frame.decompress(data)
                data = self.frame.unused_data if self.frame.eof else b""
        n = min(len(buffer), len(self.pending))
        buffer[:n], self.pending = self.pending[:n], self.pending[n:]
        return n

    def close(self) -> None:
        self.file.close()
        super().close()


def _read_jsonl(path: Path, compression: str) -> Iterator[tuple[str, Any]]:
    """One row per line; a line that is blank, not UTF-8 or not JSON comes back as a `BadRow`."""
    with _open(path, compression) as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}:{n}"
            try:
                line = (raw.removeprefix(BOM) if n == 1 else raw).decode("utf-8")
            except UnicodeDecodeError as e:
                reason = f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); expected UTF-8 text"
                yield where, BadRow(where, None, "not_utf8", reason, raw.decode("utf-8", "replace"))
                continue
            if not line.strip(" \t\r\n"):  # ASCII whitespace only: U+2028 or U+001C are not blank
                yield where, BadRow(where, None, "blank_line", "blank line", line)
                continue
            yield where, _parse_line(where, line)


def _read_json(path: Path, compression: str) -> Iterator[tuple[str, Any]]:
    """A JSON list of rows, decoded once and parsed row by row, so an unreadable row (nested too
    deeply) is a bad row in its place; JSON that is not a list of rows stops with the line."""
    with _open(path, compression) as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); expected UTF-8 text") from None
    del data
    pos = WHITESPACE.match(text).end()
    if not text.startswith("[", pos):
        found = "nothing" if pos == len(text) else repr(text[pos : pos + 20])
        raise DataError(f"{path}: expected a JSON list of rows ([{{...}}, ...]), got {found}")
    pos = WHITESPACE.match(text, pos + 1).end()
    i = 0
    while not text.startswith("]", pos):
        where = f"{path} row {i}"
        try:
            row, end = DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            end = _skip_value(path, text, pos)
            row = _too_deep(where, text[pos : min(end, pos + 200)])
        yield where, row
        pos = WHITESPACE.match(text, end).end()
        if text.startswith(",", pos):
            pos = WHITESPACE.match(text, pos + 1).end()
        elif not text.startswith("]", pos):
            line = text.count("\n", 0, pos) + 1
            raise DataError(f"{path}:{line}: invalid JSON (expected ',' or ']' after row {i})")
        i += 1
    if WHITESPACE.match(text, pos + 1).end() != len(text):
        raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: invalid JSON (extra data after the list of rows)")


def _skip_value(path: Path, text: str, pos: int) -> int:
    """The end of the nested value at `pos`, found by matching brackets outside strings."""
    depth = 0
    for m in JSON_TOKEN.finditer(text, pos):
        token = m.group()
        depth += 1 if token in ("[", "{") else -1 if token in ("]", "}") else 0
        if depth == 0:
            return m.end()
    raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: invalid JSON (a value that never closes)")


def _csv_lines(f: IO[bytes]) -> Iterator[str]:
    """Lines decoded one by one; a byte that is not UTF-8 becomes a lone surrogate, found per record."""
    for n, raw in enumerate(f):
        yield (raw.removeprefix(BOM) if n == 0 else raw).decode("utf-8", "surrogateescape")


def _csv_row(where: str, header: list[str], record: list[str]) -> Any:
    if not record:
        return BadRow(where, None, "blank_line", "blank line", "")
    for i, value in enumerate(record):
        if m := ESCAPED_BYTE.search(value):
            reason = f"not valid UTF-8 (byte 0x{ord(m.group()) - 0xDC00:02x}); expected UTF-8 text"
            readable = [v.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for v in record]
            return BadRow(where, header[i] if i < len(header) else None, "not_utf8", reason, readable)
    if len(record) > len(header):
        reason = (
            f"{len(record)} fields, but the header names {len(header)} ({', '.join(header)}); "
            "a value holding a comma needs quotes"
        )
        return BadRow(where, None, "too_many_fields", reason, record)
    if len(record) < len(header):
        missing = header[len(record) :]
        reason = f"{len(record)} fields, but the header names {len(header)}: no value for {', '.join(missing)}"
        return BadRow(where, missing[0], "too_few_fields", reason, record)
    return TextRow(zip(header, record))


def _check_header(path: Path, header: list[str]) -> None:
    """Columns are found by name: a header must name each one once, in UTF-8."""
    repeated = sorted({name for name in header if header.count(name) > 1})
    if not header or repeated or any(ESCAPED_BYTE.search(name) for name in header):
        why = f"{', '.join(map(repr, repeated))} named twice" if repeated else "blank or not UTF-8"
        raise DataError(f"{path}:1: expected a header line of distinct UTF-8 column names; it is {why}")


def _read_csv(path: Path, compression: str) -> Iterator[tuple[str, Any]]:
    """A header line, then one row per record (its location is the line the record starts on)."""
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long responses are normal
    with _open(path, compression) as f:
        reader = csv.reader(_csv_lines(f))
        try:
            header = next(reader, None)
            if header is None:
                return
            _check_header(path, header)
            while True:
                where = f"{path}:{reader.line_num + 1}"
                if (record := next(reader, None)) is None:
                    return
                yield where, _csv_row(where, header, record)
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None


def _read_parquet(path: Path, compression: str) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        if repeated := sorted({n for n in names if names.count(n) > 1}):
            raise DataError(f"{path}: columns {', '.join(map(repr, repeated))} named twice; expected unique names")
        batches = parquet.iter_batches(batch_size=CHUNK_ROWS)
        i = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{path} row {i}", row
                i += 1
    except pa.ArrowException as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None


READERS = {
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}
KNOWN = f"{', '.join(READERS)} (compressed too: {', '.join(COMPRESSIONS)}, but not .parquet)"


def file_kind(path: Path) -> tuple[str, str] | None:
    """(format, compression) from the name (`a.jsonl.gz` -> ('.jsonl', '.gz')), None if unknown."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else ""
    fmt = suffixes[-1] if suffixes else ""
    if fmt not in READERS or (fmt == ".parquet" and compression):
        return None
    return fmt, compression


def _file_rows(path: Path) -> Iterator[tuple[str, Any]]:
    fmt, compression = file_kind(path)
    try:
        yield from READERS[fmt](path, compression)
    except READ_ERRORS as e:
        raise DataError(f"{path}: cannot read it as {fmt}{compression} ({type(e).__name__}: {e})") from None


def _file_part(path: Path) -> Part:
    if file_kind(path) is None:
        raise DataError(
            f"{path}: unknown format {''.join(path.suffixes[-2:]) or path.name!r}; expected one of {KNOWN}, "
            "a folder saved with datasets.save_to_disk, or a hub dataset name"
        )
    return Part(str(path), lambda: _file_rows(path))


def _folder_parts(folder: Path) -> list[Part]:
    """Every file of a data folder; anything it cannot read stops with one error listing them all."""
    refused, files = [], []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            refused.append(f"{entry.name} (hidden)")
        elif entry.is_dir():
            refused.append(f"{entry.name}/ (a folder)")
        elif not entry.is_file() or file_kind(entry) is None:
            refused.append(f"{entry.name} (not a data file)")
        else:
            files.append(entry)
    if refused:
        raise DataError(
            f"{folder}: cannot read {len(refused)} of its entries: {', '.join(refused)}; a data folder holds "
            f"only {KNOWN} files: move the others out, or name one file"
        )
    if not files:
        raise DataError(
            f"{folder}: folder holds no data files (expected {KNOWN} files, "
            "or a folder saved with datasets.save_to_disk)"
        )
    return [_file_part(file) for file in files]


def _dataset_part(name: str, dataset: Any) -> Part:
    return Part(name, lambda: ((f"{name} row {i}", row) for i, row in enumerate(dataset)))


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _pick_split(dataset: Any, spec: str, split: str) -> Any:
    """A DatasetDict holds several splits: take the one named in `spec` (`name:split`) or `split`."""
    if not hasattr(dataset, "keys"):
        return dataset
    if split not in dataset:
        raise DataError(f"{spec}: no split {split!r}; it has {sorted(dataset)} (name one as '{spec}:SPLIT')")
    return dataset[split]


def split_spec(spec: str, default_split: str) -> tuple[str, str]:
    name, sep, split = spec.rpartition(":")
    return (name, split) if sep and name and "/" not in split else (spec, default_split)


def source_parts(spec: str, default_split: str) -> list[Part]:
    """The parts of a file, a folder of files (one part each), a `save_to_disk` folder
    (`folder[:split]`), or (for online users) a hub dataset `name[:split]`."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [_file_part(path)]
    name, split = (spec, default_split) if path.exists() else split_spec(spec, default_split)
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not _is_saved_dataset(folder):
            return _folder_parts(folder)
        import datasets

        return [_dataset_part(str(folder), _pick_split(datasets.load_from_disk(str(folder)), spec, split))]
    if file_kind(folder) is not None or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise DataError(f"{spec}: no such file or folder")
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear message
        raise DataError(
            f"{spec}: not a local file or folder, and loading it as a hub dataset "
            f"(split {split!r}) failed: {type(e).__name__}: {e}"
        ) from e
    return [_dataset_part(spec, dataset)]


def read_source(spec: str, default_split: str) -> Iterator[tuple[str, Any]]:
    """Yield `(location, row)` for every row of every part of `spec` (see `source_parts`); what
    cannot be read is a `BadRow` in its place."""
    for part in source_parts(spec, default_split):
        yield from part.rows()


def fingerprint_source(spec: str, default_split: str) -> str:
    """Content hash of local data (so renames and touches keep the cache, and a renamed copy of a test
    file is the same test), or the hub fingerprint."""
    path = Path(spec).expanduser()
    name, split = (spec, default_split) if path.exists() else split_spec(spec, default_split)
    path = Path(name).expanduser()
    h = hashlib.sha256(split.encode())
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            if file != path:  # in a folder, which file holds what; a single file is its content alone
                h.update(str(file.relative_to(path)).encode())
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


def chunks(rows: Iterable[Any], size: int = CHUNK_ROWS) -> Iterator[list[Any]]:
    """Rows in lists of `size`, so a reader's rows are checked and tokenized a bounded batch at a time."""
    chunk: list = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
