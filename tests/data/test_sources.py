"""Sources: every format, folder and hub name, each row with its location."""

from __future__ import annotations

import json
import math

import pytest

from rewardlab.data.rows import DataError, check_row
from rewardlab.data.sources import read_source, split_spec

from ..conftest import FIXTURES
from .common import COLUMNS, datamodule


def _explicit_rows() -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / "explicit.jsonl").read_text().splitlines()]


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
    (folder / "notes.txt").write_text("not data")
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
        ("data.txt", "unknown format '.txt'"),
        ("empty_folder", "folder holds no data files"),
    ],
)
def test_bad_sources(spec, pattern, tmp_path, tiny_tokenizer):
    (tmp_path / "data.txt").write_text("x")
    (tmp_path / "empty_folder").mkdir()
    dm = datamodule(tiny_tokenizer, tmp_path, train_file=str(tmp_path / spec))
    with pytest.raises(DataError, match=pattern):
        dm.prepare_data()
