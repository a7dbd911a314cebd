"""Score responses with an exported reward model:
`python -m rewardlab.score model_dir=DIR input=IN.jsonl output=OUT.jsonl` (also `rewardlab-score`).

Input rows are `{prompt, response}`, `{prompt, responses: [...]}` (a ranking's K responses; each value the
output adds is then a list in their order) or any pair schema of training (`{prompt, chosen, rejected}`,
conversational, implicit; each file's schema decided from all its rows). Texts are formatted and
truncated exactly as in training (the export records how) and scored by plain transformers in
length-sorted batches. Every output row keeps all input fields and adds `reward` (per response),
`reward_normalized` when the export has statistics, `reward_std` for an ensemble's export (the
standard deviation of its heads' rewards, in reward units), `attributes` for an attributes export (the
predicted ratings, `{name: value}`), and `text`: the formatted text that was scored
(when it had to be cut to `max_length`, the kept tokens decoded). The ids are the ones training gives
the same pair.

Exactly one output row per input row (a blank line too), in input order, so row i of the output is
row i of the input. A bad row is an error naming its line, or with `on_bad_row=skip` an output row
carrying `error` instead of a reward; a blank line is always such an error row. A row that is not
an object, or already has a field the output adds, is kept whole under `input`. The output (.jsonl,
.csv or .parquet, by its suffix) is written beside the target and renamed when complete; it may
not be the input, nor replace a file unless `overwrite=true`.
"""

from __future__ import annotations

import base64
import csv
import datetime
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig
from rich.progress import Progress

from rewardlab.data.groups import check_response
from rewardlab.data.rows import (
    BadRow,
    DataError,
    Pair,
    SchemaChoice,
    check_messages,
    check_row,
    check_values,
    decide_schema,
)
from rewardlab.data.sources import CHUNK_ROWS, Part, chunks, source_parts, split_spec
from rewardlab.errors import one_line_errors
from rewardlab.runfolder import atomic_output, claimed
from rewardlab.scoring import Scorer

log = logging.getLogger(__name__)

ADDED = ("reward", "reward_normalized", "text", "error")  # an input row holding one is kept under `input`
ADDED_WITH_STD = (*ADDED, "reward_std")  # the same for an ensemble's export
ADDED_WITH_ATTRIBUTES = (*ADDED, "attributes")  # and for an attributes export


def _plain(value: Any) -> Any:
    """A value JSON and CSV cannot hold, as text: ISO dates, exact decimals, base64 bytes."""
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)  # Decimal, timedelta, an unreadable number's own text, ...


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such a number (kept from a parquet input) is written as its text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json(value: Any) -> bytes:
    """UTF-8 JSON (valid JSON: non-finite numbers as text); a lone surrogate (invalid text kept from
    the input) is written as its escape."""
    value = _finite(value)
    try:
        return json.dumps(value, ensure_ascii=False, default=_plain, allow_nan=False).encode()
    except UnicodeEncodeError:
        return json.dumps(value, default=_plain, allow_nan=False).encode()


def _text(value: str) -> str:
    return value.encode("utf-8", "backslashreplace").decode()


class JsonlWriter:
    """One JSON object per line, written as rows come."""

    def __init__(self, path: Path):
        self.file = open(path, "xb")

    def write(self, row: dict) -> None:
        self.file.write(_json(row) + b"\n")

    def close(self) -> None:
        self.file.close()


class _Buffered:
    """Rows kept until `close`: a CSV header or a parquet schema needs every column first."""

    def __init__(self, path: Path):
        self.path, self.rows = path, []

    def write(self, row: dict) -> None:
        self.rows.append(row)

    def names(self) -> list[str]:
        return list(dict.fromkeys(key for row in self.rows for key in row))


class CsvWriter(_Buffered):
    """A header of every column seen, then the rows; nested values as JSON, None as an empty cell."""

    @staticmethod
    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, str):
            return _text(value)
        if isinstance(value, (dict, list, tuple, bool, int, float)):
            return _json(value).decode()
        return _text(_plain(value))

    def close(self) -> None:
        names = self.names()
        with open(self.path, "x", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(map(self.cell, names))
            writer.writerows([self.cell(row.get(name)) for name in names] for row in self.rows)


class ParquetWriter(_Buffered):
    """Columns keep their types (dates, decimals, bytes, nested); a column mixing types is JSON text."""

    def close(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {}
        for name in self.names():
            values = [row.get(name) for row in self.rows]
            try:
                columns[name] = pa.array(values)
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                log.warning("output column %r holds values of several types: written as JSON text", name)
                columns[name] = pa.array([None if v is None else _json(v).decode() for v in values], pa.string())
        with open(self.path, "xb") as f:
            pq.write_table(pa.table(columns), f)


WRITERS = {".jsonl": JsonlWriter, ".csv": CsvWriter, ".parquet": ParquetWriter}


def check_output(source: str, output: str, overwrite: bool) -> Path:
    """Refuse, before anything is read, an output that is the input, lies inside an input folder,
    has an unknown format, or would replace a file without `overwrite=true`."""
    out, src = Path(output).expanduser(), Path(source).expanduser()
    if not src.exists():  # `folder:split` names a folder too
        src = Path(split_spec(source, "train")[0]).expanduser()
    if out.suffix.lower() not in WRITERS:
        raise DataError(f"output={output}: unknown format {out.suffix!r}; expected one of {', '.join(WRITERS)}")
    if out.exists() and src.exists() and os.path.samefile(src, out):
        raise DataError(f"output={output} is the input file; scores go to a new file (choose another output)")
    if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
        raise DataError(f"output={output} is inside the input folder {source}; choose an output outside it")
    if out.is_dir():
        raise DataError(f"output={output} is a folder; expected a file name")
    if out.exists() and not overwrite:
        raise DataError(f"output={output} exists; pass overwrite=true to replace it")
    return out


def _is_single(row: Any, columns: dict[str, str]) -> bool:
    """A row of one response, or of a prompt's K responses (`responses`): not a pair."""
    return isinstance(row, dict) and (columns["response"] in row or columns["responses"] in row)


def _responses(row: dict, where: str, columns: dict[str, str]) -> tuple[Any, list] | BadRow:
    """A `{prompt, responses: [...]}` row (a ranking's, its order fields unread): every response non-empty."""
    if (bad := check_values(row, where)) is not None:
        return bad
    prompt, responses = row.get(columns["prompt"], ""), row[columns["responses"]]
    if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and check_messages(prompt)):
        return BadRow(
            where, columns["prompt"], "not_a_string", f"expected a string or messages, got {prompt!r:.40}", row
        )
    if not isinstance(responses, list) or not responses:
        return BadRow(
            where, columns["responses"], "not_a_list", f"expected a list of responses, got {responses!r:.40}", row
        )
    for i, response in enumerate(responses):
        if (bad := check_response(response, where, f"{columns['responses']}[{i}]", row)) is not None:
            return bad
    return prompt, responses


def _pair_rows(part: Part, columns: dict[str, str]) -> Iterator[Any]:
    """The rows of a part that are pairs: only they say which schema the file's pairs follow."""
    return (row for _, row in part.rows() if not _is_single(row, columns))


def _single(row: dict, where: str, columns: dict[str, str]) -> tuple[Any, Any] | BadRow:
    """A `{prompt, response}` row: prompt a string or messages (may be empty), response non-empty."""
    if (bad := check_values(row, where)) is not None:
        return bad
    prompt, response = row.get(columns["prompt"], ""), row[columns["response"]]
    for key, value in (("prompt", prompt), ("response", response)):
        if isinstance(value, list) and value and (problem := check_messages(value)):
            return BadRow(where, columns[key], "bad_messages", problem, row)
        if not isinstance(value, (str, list)):
            return BadRow(where, columns[key], "not_a_string", f"expected a string or messages, got {value!r:.40}", row)
    if not (response.strip() if isinstance(response, str) else response):
        return BadRow(where, columns["response"], "empty_response", "empty response", row)
    return prompt, response


def _jobs(row: Any, where: str, choice: SchemaChoice, scorer: Scorer, columns: dict[str, str]) -> list | BadRow:
    """What to score for one input row, `(side, text, ids)` per response, or why not; side is None for a
    single response, chosen/rejected for a pair, the position for each of a row's `responses`."""
    if isinstance(row, dict) and columns["responses"] in row:
        found = _responses(row, where, columns)
        if isinstance(found, BadRow):
            return found
        return [(i, *scorer.encode(found[0], response)) for i, response in enumerate(found[1])]
    if _is_single(row, columns):
        single = _single(row, where, columns)
        return single if isinstance(single, BadRow) else [(None, *scorer.encode(*single))]
    pair = check_row(row, where, choice, columns)
    if isinstance(pair, Pair):
        return [(side, *scorer.encode(pair.prompt, getattr(pair, side))) for side in ("chosen", "rejected")]
    return pair


class _Bar:
    """One progress bar over all chunks (`Scorer.score` adds a task per call)."""

    def __init__(self, progress: Progress):
        self.progress, self.total = progress, 0
        self.task = progress.add_task("scoring", total=None)

    def add_task(self, description: str, total: int) -> Any:
        self.total += total
        self.progress.update(self.task, total=self.total)
        return self.task

    def advance(self, task: Any, n: int) -> None:
        self.progress.advance(task, n)


def _score_chunk(chunk: list, scorer: Scorer, cfg: DictConfig, bar: _Bar) -> Iterator[tuple[dict, bool]]:
    """The output rows of one chunk of `(where, row, schema choice)`, in order, each with whether
    it was scored."""
    columns = dict(cfg.columns)
    jobs: list[tuple[int, str | None, str, list[int]]] = []
    errors: dict[int, str] = {}
    for i, (where, row, choice) in enumerate(chunk):
        try:
            result = _jobs(row, where, choice, scorer, columns)
        except DataError as e:
            result = BadRow(where, None, "cannot_format", str(e), row)
        if isinstance(result, BadRow):
            if cfg.on_bad_row == "error" and result.code != "blank_line":
                raise DataError(f"{result.message()} (on_bad_row=skip writes an error row instead)")
            errors[i] = result.message()
        else:
            jobs += [(i, *job) for job in result]
    sequences = [ids for *_, ids in jobs]
    names = scorer.attributes or []
    if scorer.has_std or names:  # each row: the reward, then the spread or the predicted ratings
        scored = scorer.score(sequences, bar, with_std=scorer.has_std, with_attributes=bool(names))
    else:
        scored = scorer.score(sequences, bar)[:, None]
    results: dict[int, dict[str, Any]] = {}
    for (i, side, text, _), values in zip(jobs, scored):
        out = results.setdefault(i, {})
        reward = float(values[0])
        for key, value in (
            ("reward", reward),
            ("reward_normalized", scorer.normalized(reward)),
            ("reward_std", float(values[1]) if scorer.has_std else None),
            ("attributes", dict(zip(names, map(float, values[1:]))) if names else None),
            ("text", text),
        ):
            if value is None:
                continue
            if side is None:
                out[key] = value
            elif isinstance(side, int):  # the responses of a `responses` row, in their order
                out.setdefault(key, []).append(value)
            else:
                out[key] = {**out.get(key, {}), side: value}
    for i, (_, row, _) in enumerate(chunk):
        base = row.row if isinstance(row, BadRow) else row
        added = ADDED_WITH_STD if scorer.has_std else ADDED_WITH_ATTRIBUTES if names else ADDED
        if not isinstance(base, dict) or any(key in base for key in added):
            base = {"input": base}  # kept whole, not overwritten by what the output adds
        yield ({**base, "error": errors[i]}, False) if i in errors else ({**base, **results[i]}, True)


def score_file(cfg: DictConfig) -> dict[str, int]:
    """Score every row of `cfg.input` into `cfg.output`; return counts of rows, scored and errors."""
    if cfg.on_bad_row not in ("error", "skip"):
        raise DataError(f"on_bad_row: unknown {cfg.on_bad_row!r}; expected 'error' or 'skip'")
    out = check_output(cfg.input, cfg.output, cfg.overwrite)
    columns = dict(cfg.columns)
    parts = source_parts(cfg.input, "train")
    choices = [decide_schema(_pair_rows(part, columns), columns, cfg.schema, part.name) for part in parts]
    scorer = Scorer(cfg.model_dir, cfg.trust_remote_code, cfg.batch_size, cfg.dtype)
    counts: Counter[str] = Counter()
    rows = ((where, row, choice) for part, choice in zip(parts, choices) for where, row in part.rows())
    with atomic_output(out) as tmp, Progress() as progress:
        writer, bar = WRITERS[out.suffix.lower()](tmp), _Bar(progress)
        try:
            for chunk in chunks(rows, CHUNK_ROWS):
                for row, scored in _score_chunk(chunk, scorer, cfg, bar):
                    writer.write(row)
                    counts["rows"] += 1
                    counts["scored" if scored else "errors"] += 1
        finally:
            writer.close()
    counts = {key: counts[key] for key in ("rows", "scored", "errors")}
    log.info("scored %(scored)d of %(rows)d rows (%(errors)d errors) -> %(out)s", {**counts, "out": out})
    return counts


@hydra.main(version_base="1.3", config_path="conf", config_name="score")
@one_line_errors
def main(cfg: DictConfig) -> None:
    with claimed(cfg, results=None):
        score_file(cfg)


if __name__ == "__main__":
    main()
