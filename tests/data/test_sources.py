"""Sources: every format, compressed or not, folders and hub names, each row with its location;
nothing a reader cannot use is dropped or crashes it: it is a bad row in its place."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import math
import re
import tracemalloc

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewardlab.data.rows import BadRow, DataError, Pair, check_row, decide_schema
from rewardlab.data.sources import fingerprint_source, read_source, source_parts, split_spec

from ..conftest import FIXTURES
from .common import COLUMNS, datamodule, ready, write

BOM = b"\xef\xbb\xbf"
COMPRESS = {
    "": lambda b: b,
    ".gz": gzip.compress,
    ".bz2": bz2.compress,
    ".xz": lzma.compress,
    ".zst": lambda b: zstandard.ZstdCompressor().compress(b),
}
ROWS = [
    {"prompt": "What is 3 + 3?", "chosen": "6", "rejected": "7", "margin": 0.5},
    {"prompt": "Pick a fruit, please.", "chosen": "An apple.", "rejected": "A chair.", "margin": 1.0},
]


def _explicit_rows() -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / "explicit.jsonl").read_text().splitlines()]


def _encode(fmt: str, rows: list[dict]) -> bytes:
    if fmt in (".jsonl", ".ndjson"):
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    if fmt == ".json":
        return json.dumps(rows, indent=1).encode()
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def _pairs(spec: str) -> list[Pair | BadRow]:
    rows = list(read_source(spec, "train"))
    return [check_row(r, w, decide_schema([r for _, r in rows], COLUMNS), COLUMNS) for w, r in rows]


def test_each_source_format_reads_the_same_rows(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _explicit_rows()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.jsonl").write_text((FIXTURES / "explicit.jsonl").read_text())
    for spec in (tmp_path / "d.parquet", tmp_path / "saved", folder):
        read = [r for _, r in read_source(str(spec), "train")]
        chosen = [check_row(r, "x", "explicit", COLUMNS).chosen for r in read]
        assert chosen == ["Paris.", "Hola.", "An answer without a prompt."]
    assert next(read_source(str(tmp_path / "d.parquet"), "train"))[0].endswith("d.parquet row 0")


def test_csv_and_json_fixtures():
    csv_rows = list(read_source(str(FIXTURES / "explicit.csv"), "train"))
    assert csv_rows[0][0].endswith("explicit.csv:2")
    first, second = (check_row(r, w, "explicit", COLUMNS) for w, r in csv_rows)
    assert (first.chosen, first.margin) == ("6", 0.5) and math.isnan(second.margin)
    json_rows = list(read_source(str(FIXTURES / "explicit.json"), "train"))
    assert json_rows[1][0].endswith("explicit.json row 1") and json_rows[1][1]["chosen"] == "No."


def test_save_to_disk_dataset_dict_picks_the_split(tmp_path):
    import datasets

    rows = _explicit_rows()
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:2]), "test": datasets.Dataset.from_list(rows[2:])}
    ).save_to_disk(str(tmp_path / "dd"))
    assert len(list(read_source(str(tmp_path / "dd"), "train"))) == 2
    assert len(list(read_source(f"{tmp_path / 'dd'}:test", "train"))) == 1
    with pytest.raises(DataError, match="no split 'val'"):
        list(read_source(str(tmp_path / "dd"), "val"))


def test_hub_names_are_tried_on_the_hub_and_fail_clearly_offline():
    assert split_spec("Anthropic/hh-rlhf:test", "train") == ("Anthropic/hh-rlhf", "test")
    assert split_spec("Anthropic/hh-rlhf", "train") == ("Anthropic/hh-rlhf", "train")
    with pytest.raises(DataError, match="not a local file or folder, and loading it as a hub dataset"):
        list(read_source("nobody-here/no-such-dataset", "train"))


@pytest.mark.parametrize(
    "spec, pattern",
    [
        ("missing.jsonl", "no such file"),
        ("missing.jsonl.gz", "no such file"),
        ("data.txt", "unknown format '.txt'"),
        ("data.parquet.gz", "unknown format '.parquet.gz'"),
        ("empty_folder", "folder holds no data files"),
    ],
)
def test_bad_sources(spec, pattern, tmp_path, tiny_tokenizer):
    (tmp_path / "data.txt").write_text("x")
    (tmp_path / "data.parquet.gz").write_bytes(gzip.compress(b"x"))
    (tmp_path / "empty_folder").mkdir()
    dm = datamodule(tiny_tokenizer, tmp_path, train_file=str(tmp_path / spec))
    with pytest.raises(DataError, match=pattern):
        dm.prepare_data()


# ------------------------------------------------------------------ class 2: encodings users have


@pytest.mark.parametrize("fmt", [".jsonl", ".ndjson", ".json", ".csv"])
@pytest.mark.parametrize("compression", ["", ".gz", ".zst"])
def test_a_byte_order_mark_is_accepted(fmt, compression, tmp_path):
    path = write(tmp_path, f"excel{fmt}{compression}", COMPRESS[compression](BOM + _encode(fmt, ROWS)))
    pairs = _pairs(str(path))
    assert [(p.prompt, p.chosen, p.margin) for p in pairs] == [(r["prompt"], r["chosen"], r["margin"]) for r in ROWS]


def test_a_spreadsheet_csv_with_a_bom_keeps_its_prompts_in_training(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"Question {i}?", "chosen": f"yes {i}", "rejected": f"no {i}", "margin": ""} for i in range(3)]
    path = write(tmp_path, "sheet.csv", BOM + _encode(".csv", rows).replace(b"\n", b"\r\n"))
    dm = ready(datamodule(tiny_tokenizer, tmp_path, train_file=str(path)))
    assert dm.datasets["train"].meta["schema"] == "explicit"
    assert tiny_tokenizer.decode(dm.datasets["train"][0]["chosen"]).startswith("[BOS]Question 0?[SEP]")


@pytest.mark.parametrize(
    "line, field",
    [
        (r'{"prompt": "\ud800", "chosen": "a", "rejected": "b"}', "prompt"),
        (r'{"prompt": "p", "chosen": "a\udfffb", "rejected": "b"}', "chosen"),
        (r'{"prompt": "p", "chosen": "a", "rejected": "b\u0000"}', "rejected"),
        (
            r'{"prompt": [{"role": "user", "content": "\udc00"}], "chosen": [{"role": "assistant", "content": "a"}], '
            r'"rejected": [{"role": "assistant", "content": "b"}]}',
            "prompt[0].content",
        ),
    ],
)
@pytest.mark.parametrize("policy", ["error", "skip"])
def test_invalid_text_is_a_bad_row_naming_file_line_and_field(line, field, policy, tmp_path, tiny_tokenizer):
    good = '{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
    path = write(tmp_path, "t.jsonl", good + line + "\n" + good)
    dm = datamodule(tiny_tokenizer, tmp_path, train_file=str(path), on_bad_row=policy)
    if policy == "error":
        with pytest.raises(DataError, match=rf"t\.jsonl:2: field '{re.escape(field)}': contains"):
            dm.prepare_data()
        return
    ready(dm)
    bad = [json.loads(b) for b in (tmp_path / "run" / "bad_rows.jsonl").read_text().splitlines()]
    assert [(b["where"][-9:], b["field"], b["code"]) for b in bad] == [("t.jsonl:2", field, "invalid_text")]


@pytest.mark.parametrize("fmt", [".jsonl", ".csv"])
def test_bytes_that_are_not_utf8_are_a_bad_row_in_place(fmt, tmp_path):
    content = _encode(fmt, ROWS).replace(b"An apple.", b"An \xff apple.")
    rows = list(read_source(str(write(tmp_path, f"t{fmt}", content)), "train"))
    assert len(rows) == 2 and isinstance(rows[1][1], BadRow)
    assert rows[1][1].code == "not_utf8" and rows[1][0].endswith(f"t{fmt}:{2 if fmt == '.jsonl' else 3}")
    assert "byte 0xff" in rows[1][1].reason


# --------------------------------------------------------------- class 3: folders and compression


@pytest.mark.parametrize("fmt", [".jsonl", ".ndjson", ".json", ".csv"])
@pytest.mark.parametrize("compression", sorted(COMPRESS))
def test_compressed_files_read_like_plain_ones(fmt, compression, tmp_path):
    path = write(tmp_path, f"d{fmt}{compression}", COMPRESS[compression](_encode(fmt, ROWS)))
    rows = list(read_source(str(path), "train"))
    assert [check_row(r, w, "explicit", COLUMNS).chosen for w, r in rows] == ["6", "An apple."]
    assert rows[1][0] == (f"{path} row 1" if fmt == ".json" else f"{path}:{3 if fmt == '.csv' else 2}")


def test_a_folder_reads_every_data_file_in_name_order(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i, (fmt, compression) in enumerate([(".jsonl", ".gz"), (".ndjson", ""), (".json", ".zst"), (".csv", ".bz2")]):
        write(folder, f"{i}{fmt}{compression}", COMPRESS[compression](_encode(fmt, ROWS)))
    parts = source_parts(str(folder), "train")
    assert [p.name.rsplit("/", 1)[1] for p in parts] == ["0.jsonl.gz", "1.ndjson", "2.json.zst", "3.csv.bz2"]
    assert [check_row(r, w, "explicit", COLUMNS).chosen for w, r in read_source(str(folder), "train")] == [
        "6",
        "An apple.",
    ] * 4


def test_a_folder_refuses_everything_it_cannot_read_in_one_error(tmp_path, tiny_tokenizer):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    write(folder, "a.jsonl", _encode(".jsonl", ROWS))
    write(folder, "notes.txt", "not data")
    write(folder, ".hidden.jsonl", _encode(".jsonl", ROWS))
    write(folder, "b.parquet.gz", b"x")
    with pytest.raises(DataError) as err:
        datamodule(tiny_tokenizer, tmp_path, train_file=str(folder)).prepare_data()
    message = str(err.value)
    assert "cannot read 4 of its entries" in message and "a.jsonl (" not in message
    for name in (".hidden.jsonl (hidden)", "sub/ (a folder)", "notes.txt (not a data file)", "b.parquet.gz"):
        assert name in message


def test_a_corrupt_compressed_file_is_an_error_naming_it(tmp_path):
    path = write(tmp_path, "d.jsonl.gz", gzip.compress(_encode(".jsonl", ROWS))[:-12])
    with pytest.raises(DataError, match=r"d\.jsonl\.gz: cannot read it as \.jsonl\.gz"):
        list(read_source(str(path), "train"))


# ------------------------------------------------------------ class 4: values that crash readers

CRASHERS = {
    "huge_int": ("1" + "0" * 5000, "bad_number", "5001 digits"),
    "beyond_float": ("1e999", "bad_number", "beyond float range"),
    "nan": ("NaN", "bad_number", "NaN is not a number"),
    "infinity": ("-Infinity", "bad_number", "-Infinity is not a number"),
    "deep": ("[" * 100_000 + "]" * 100_000, "too_deep", "nested deeper"),
    "deep_but_parsable": ("[" * 500 + "]" * 500, "too_deep", "nested deeper"),
}


@pytest.mark.parametrize("case", sorted(CRASHERS))
@pytest.mark.parametrize("fmt", [".jsonl", ".json"])
@pytest.mark.parametrize("key", ["margin", "extra", "chosen"])
def test_values_python_cannot_hold_are_bad_rows_naming_file_and_line(case, fmt, key, tmp_path):
    value, code, reason = CRASHERS[case]
    bad = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", key: "VALUE"}).replace('"VALUE"', value)
    text = "\n".join([json.dumps(ROWS[0]), bad, json.dumps(ROWS[1])])
    path = write(tmp_path, f"t{fmt}", text + "\n" if fmt == ".jsonl" else f"[{text.replace(chr(10), ',' + chr(10))}]")
    results = _pairs(str(path))
    assert [type(r).__name__ for r in results] == ["Pair", "BadRow", "Pair"]
    assert results[1].code == code and reason in results[1].reason
    assert results[1].where == (f"{path}:2" if fmt == ".jsonl" else f"{path} row 1")
    if code == "bad_number":
        assert results[1].field == key
    json.dumps(results[1].row, default=str)  # the report can be written


# ----------------------------------------------------------------------------------- class 5: CSV


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(widths=st.lists(st.integers(0, 7), min_size=1, max_size=8))
def test_csv_records_of_the_wrong_width_are_bad_rows_with_their_reason(widths, tmp_path):
    header = ["prompt", "chosen", "rejected", "margin"]
    lines = [",".join(header)] + [",".join(f"v{i}{j}" for j in range(w)) for i, w in enumerate(widths)]
    path = write(tmp_path, "w.csv", "\n".join(lines) + "\n")
    rows = list(read_source(str(path), "train"))
    assert len(rows) == len(widths)  # one row per record, blank ones included
    for n, ((where, row), width) in enumerate(zip(rows, widths), start=2):
        assert where == f"{path}:{n}"
        if width == len(header):
            assert row == dict(zip(header, lines[n - 1].split(",")))
        elif width == 0:
            assert row.code == "blank_line"
        else:
            code = "too_many_fields" if width > len(header) else "too_few_fields"
            assert row.code == code and f"{width} fields, but the header names 4" in row.reason
            assert row.row == lines[n - 1].split(",")  # nothing lost, nothing put under key None
            if width < len(header):
                assert row.field == header[width] and f"no value for {', '.join(header[width:])}" in row.reason


def test_a_csv_with_a_repeated_column_is_refused(tmp_path):
    path = write(tmp_path, "d.csv", "prompt,chosen,chosen\np,a,b\n")
    with pytest.raises(DataError, match=r"d\.csv:1: .*'chosen' named twice"):
        list(read_source(str(path), "train"))


def test_a_multiline_csv_record_is_named_by_its_first_line(tmp_path):
    path = write(tmp_path, "d.csv", 'prompt,chosen,rejected\n"two\nlines",a,b\np,"c\n\nd",e\n')
    assert [w.rsplit(":", 1)[1] for w, _ in read_source(str(path), "train")] == ["2", "4"]


# --------------------------------------------------------------------------- class 7: blank lines


def test_blank_lines_are_marked_counted_and_never_stop_training(tmp_path, tiny_tokenizer):
    good = [json.dumps({"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"}) for i in range(3)]
    path = write(tmp_path, "t.jsonl", "\n".join([good[0], "", "  \t", good[1], "\r", good[2]]) + "\n\n")
    rows = list(read_source(str(path), "train"))
    assert [r.code if isinstance(r, BadRow) else "row" for _, r in rows] == [
        "row",
        "blank_line",
        "blank_line",
        "row",
        "blank_line",
        "row",
        "blank_line",
    ]
    dm = ready(datamodule(tiny_tokenizer, tmp_path, train_file=str(path)))  # on_bad_row=error
    assert dm.datasets["train"].meta["counts"] == {"read": 3, "used": 3, "blank_lines": 4}
    assert not (tmp_path / "run" / "bad_rows.jsonl").exists()


# ------------------------------------------------------------------------------ class 8: memory


@pytest.mark.parametrize("fmt, limit", [(".jsonl", 0.1), (".jsonl.gz", 0.1), (".csv", 0.1), (".json", 2.5)])
def test_reading_costs_little_more_than_the_file(fmt, limit, tmp_path):
    row = {"prompt": "p" * 2000, "chosen": "c" * 2000, "rejected": "r" * 2000}
    rows = [row] * 4000  # ~24 MB of text
    data = _encode(fmt.removesuffix(".gz"), rows)
    path = write(tmp_path, f"big{fmt}", gzip.compress(data, 1) if fmt.endswith(".gz") else data)
    tracemalloc.start()
    try:
        n = sum(1 for _ in read_source(str(path), "train"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == len(rows) and peak < limit * len(data), (peak, len(data))


@pytest.mark.parametrize("cut", [0.3, 0.5, 0.9])
def test_a_compressed_file_cut_short_is_an_error_not_fewer_rows(cut, tmp_path):
    rows = "".join(json.dumps({"prompt": f"p{i}", "chosen": "a" * 250, "rejected": "b"}) + "\n" for i in range(3000))
    whole = {".zst": zstandard.ZstdCompressor().compress, ".gz": gzip.compress, ".xz": lzma.compress}
    for suffix, compress in whole.items():
        blob = compress(rows.encode())
        (tmp_path / f"two.jsonl{suffix}").write_bytes(blob + blob)  # several frames/members read as one file
        assert sum(1 for _ in read_source(str(tmp_path / f"two.jsonl{suffix}"), "train")) == 6000
        cut_file = tmp_path / f"cut.jsonl{suffix}"
        cut_file.write_bytes(blob[: int(len(blob) * cut)])
        with pytest.raises(DataError, match=f"{re.escape(str(cut_file))}: cannot read it"):
            list(read_source(str(cut_file), "train"))


def test_a_parquet_file_with_a_column_named_twice_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_arrays([pa.array(["p"]), pa.array(["a"]), pa.array(["b"]), pa.array(["c"])],
                                 names=["prompt", "chosen", "rejected", "chosen"])  # fmt: skip
    pq.write_table(table, tmp_path / "dup.parquet")
    with pytest.raises(DataError, match="dup.parquet: columns 'chosen' named twice"):
        list(read_source(str(tmp_path / "dup.parquet"), "train"))


@pytest.mark.parametrize("line", ["\u2028", "\x1c", "\u00a0", "\u3000"])
def test_a_line_of_unicode_separators_is_a_row_not_a_blank_line(line, tmp_path):
    path = write(tmp_path, "t.jsonl", json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n" + line + "\n")
    second = [row for _, row in read_source(str(path), "train")][1]
    assert isinstance(second, BadRow) and second.code != "blank_line"


def test_a_files_fingerprint_is_its_content_not_its_name(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    (tmp_path / "renamed.jsonl").write_text((tmp_path / "a.jsonl").read_text())
    (tmp_path / "other.jsonl").write_text('{"prompt": "p", "chosen": "b", "rejected": "a"}\n')
    same = fingerprint_source(str(tmp_path / "a.jsonl"), "test")
    assert same == fingerprint_source(str(tmp_path / "renamed.jsonl"), "test")
    assert same != fingerprint_source(str(tmp_path / "other.jsonl"), "test")
    assert same != fingerprint_source(str(tmp_path / "a.jsonl"), "train")
