"""Sources: read the raw rows of a file, a folder of files, a `save_to_disk` folder or a hub dataset,
each with its location (`file:line` or `file row i`) so every later message can name it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rewardlab.data.rows import BadRow, DataError

CHUNK_ROWS = 1024


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


def split_spec(spec: str, default_split: str) -> tuple[str, str]:
    name, sep, split = spec.rpartition(":")
    return (name, split) if sep and name and "/" not in split else (spec, default_split)


def read_source(spec: str, default_split: str) -> Iterator[tuple[str, Any]]:
    """Yield `(location, row)` for every row of a file, a folder of files, a `save_to_disk` folder
    (`folder[:split]`), or (for online users) a hub dataset `name[:split]`."""
    path = Path(spec).expanduser()
    if path.is_file():
        yield from _read_file(path)
        return
    name, split = (spec, default_split) if path.exists() else split_spec(spec, default_split)
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
    name, split = (spec, default_split) if path.exists() else split_spec(spec, default_split)
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
