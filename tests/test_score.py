"""`rewardlab.score`: one output row per input row, in order, whatever the row holds; the input is
never harmed and a half-written output never appears."""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewardlab import score as score_module
from rewardlab.data.rows import DataError
from rewardlab.export import export
from rewardlab.score import score_file
from rewardlab.train import train

from .conftest import compose_config

QUIZ = Path(__file__).resolve().parent.parent / "rewardlab" / "assets" / "quiz"


class FakeScorer:
    """Stands in for an exported model (a response's reward is its length), so that what score does
    with rows can be tested in milliseconds; `exported` below checks the real one."""

    has_std = False  # one head: no spread to report
    attributes = None  # and no attributes

    def __init__(self, *args: object) -> None:
        self.prompts: list = []

    def encode(self, prompt: object, response: object) -> tuple[str, list[int]]:
        self.prompts.append(prompt)
        text = f"{prompt}|{response}"
        return text, [ord(c) % 97 for c in text]

    def score(self, sequences: list[list[int]], progress: object = None) -> np.ndarray:
        task = progress.add_task("scoring", total=len(sequences))
        progress.advance(task, len(sequences))
        return np.array([float(len(s)) for s in sequences])

    def normalized(self, reward: float) -> float | None:
        return None


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> type[FakeScorer]:
    monkeypatch.setattr(score_module, "Scorer", FakeScorer)
    return FakeScorer


def run_score(tmp_path: Path, cache_dir: Path, source: Path | str, output: Path | str, *overrides: str) -> dict:
    cfg = compose_config(
        "score", ["model_dir=unused", f"input={source}", f"output={output}", *overrides], tmp_path / "s", cache_dir
    )
    return score_file(cfg)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().split(b"\n")[:-1]]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---------------------------------------------------------- one output row per input row, in order

GOOD = {
    "single": lambda k: json.dumps({"id": k, "prompt": "Is 4 even?", "response": f"yes {k}"}),
    "pair": lambda k: json.dumps({"id": k, "prompt": "Is 4 even?", "chosen": f"yes {k}", "rejected": "no"}),
}
BAD = {
    "blank": lambda k: " \t" * (k % 2),
    "broken": lambda k: '{"prompt": "p", "response": ',
    "not_utf8": lambda k: b'{"prompt": "\xff", "response": "r"}',
    "empty_response": lambda k: json.dumps({"prompt": "p", "response": " "}),
    "identical": lambda k: json.dumps({"prompt": "p", "chosen": "Paris.", "rejected": "Paris. "}),
    "surrogate": lambda k: '{"prompt": "\\ud800", "response": "r"}',
    "nan": lambda k: '{"prompt": "p", "response": "r", "weight": NaN}',
    "deep": lambda k: "[" * 20_000 + "]" * 20_000,
    "role": lambda k: json.dumps({"prompt": [{"role": "bot", "content": "hi"}], "response": "r"}),
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.sampled_from(sorted(GOOD) + sorted(BAD)), min_size=1, max_size=25))
def test_every_input_line_gives_one_output_row_in_the_same_place(kinds, fake, tmp_path, cache_dir):
    lines = [(GOOD | BAD)[kind](k) for k, kind in enumerate(kinds)]
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    output = tmp_path / "out.jsonl"
    counts = run_score(tmp_path, cache_dir, source, output, "on_bad_row=skip", "overwrite=true")
    out = read_jsonl(output)
    assert len(out) == len(kinds) == counts["rows"] and counts["errors"] == sum(k in BAD for k in kinds)
    for n, (kind, row) in enumerate(zip(kinds, out), start=1):
        if kind in GOOD:
            assert row["id"] == n - 1 and "reward" in row and "error" not in row
        else:
            assert "reward" not in row and row["error"].startswith(f"{source}:{n}:"), (kind, row)
    assert leftovers(tmp_path) == []


def test_error_mode_stops_naming_the_line_and_writes_nothing(fake, tmp_path, cache_dir):
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join([GOOD["single"](0), "", GOOD["pair"](1), BAD["empty_response"](2)]) + "\n")
    with pytest.raises(DataError, match=r"in\.jsonl:4: field 'response': empty response \(on_bad_row=skip"):
        run_score(tmp_path, cache_dir, source, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists() and leftovers(tmp_path) == []
    source.write_text("\n".join([GOOD["single"](0), "", GOOD["pair"](1)]) + "\n")  # a blank line never stops
    assert run_score(tmp_path, cache_dir, source, tmp_path / "out.jsonl") == {"rows": 3, "scored": 2, "errors": 1}
    assert "blank line" in read_jsonl(tmp_path / "out.jsonl")[1]["error"]


def test_pairs_are_checked_with_the_schema_all_rows_of_their_file_support(fake, tmp_path, cache_dir):
    rows = [{"prompt": None, "chosen": "a", "rejected": "b"}]
    rows += [{"prompt": f"Question {i}?", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(3)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = run_score(tmp_path, cache_dir, source, tmp_path / "o.jsonl", "on_bad_row=skip")
    out = read_jsonl(tmp_path / "o.jsonl")
    assert counts == {"rows": 4, "scored": 3, "errors": 1}
    assert "in.jsonl:1: field 'prompt': expected a string, got null" in out[0]["error"]
    assert [o["text"]["chosen"] for o in out[1:]] == [f"Question {i}?|yes {i}" for i in range(3)]


# --------------------------------------------------------------------------- the input is never harmed


@pytest.mark.parametrize("how", ["same", "dotted", "symlink", "hardlink", "inside_folder", "inside_folder_split"])
@pytest.mark.parametrize("overwrite", ["false", "true"])
def test_an_output_that_is_the_input_is_refused_before_anything_is_read(
    how, overwrite, fake, tmp_path, cache_dir, monkeypatch
):
    folder = tmp_path / "data"
    folder.mkdir()
    source = folder / "in.jsonl"
    source.write_text(GOOD["single"](0) + "\n")
    before = source.read_bytes()
    output = {
        "same": source,
        "dotted": f"{folder}/../data/./in.jsonl",
        "symlink": tmp_path / "link.jsonl",
        "hardlink": tmp_path / "hard.jsonl",
        "inside_folder": folder / "scores.jsonl",
        "inside_folder_split": folder / "scores.jsonl",
    }[how]
    if how == "symlink":
        output.symlink_to(source)
    if how == "hardlink":
        os.link(source, output)
    spec = {"inside_folder": folder, "inside_folder_split": f"{folder}:train"}.get(how, source)

    def no_reading(*args: object) -> None:
        raise AssertionError("read the input")

    monkeypatch.setattr(score_module, "source_parts", no_reading)
    with pytest.raises(DataError, match="is the input file|inside the input folder"):
        run_score(tmp_path, cache_dir, spec, output, f"overwrite={overwrite}")
    assert source.read_bytes() == before and leftovers(folder) == []


def test_an_existing_output_is_replaced_only_with_overwrite(fake, tmp_path, cache_dir):
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(GOOD["single"](0) + "\n")
    output.write_text("precious\n")
    with pytest.raises(DataError, match=r"out\.jsonl exists; pass overwrite=true"):
        run_score(tmp_path, cache_dir, source, output)
    assert output.read_text() == "precious\n"
    run_score(tmp_path, cache_dir, source, output, "overwrite=true")
    assert read_jsonl(output)[0]["id"] == 0


def test_an_unknown_output_format_is_refused(fake, tmp_path, cache_dir):
    source = tmp_path / "in.jsonl"
    source.write_text(GOOD["single"](0) + "\n")
    with pytest.raises(DataError, match=r"unknown format '\.txt'; expected one of \.jsonl, \.csv, \.parquet"):
        run_score(tmp_path, cache_dir, source, tmp_path / "out.txt")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_a_crash_midway_leaves_the_old_output_and_no_half_file(suffix, fake, tmp_path, cache_dir, monkeypatch):
    source, output = tmp_path / "in.jsonl", tmp_path / f"out{suffix}"
    source.write_text("".join(GOOD["single"](k) + "\n" for k in range(10)))
    output.write_text("old\n")
    calls = []

    def crash(self: FakeScorer, sequences: list, progress: object = None) -> np.ndarray:
        calls.append(len(sequences))
        if len(calls) == 3:
            raise RuntimeError("the machine died")
        return np.zeros(len(sequences))

    monkeypatch.setattr(score_module, "CHUNK_ROWS", 2)
    monkeypatch.setattr(FakeScorer, "score", crash)
    with pytest.raises(RuntimeError, match="the machine died"):
        run_score(tmp_path, cache_dir, source, output, "overwrite=true")
    assert output.read_text() == "old\n" and leftovers(tmp_path) == []


def test_input_fields_the_output_adds_are_kept_not_overwritten(fake, tmp_path, cache_dir):
    source = tmp_path / "in.jsonl"
    rows = [
        {"prompt": "p", "response": "r", "reward": 0.7, "text": "mine"},
        {"prompt": "p", "response": "", "error": "x"},
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_score(tmp_path, cache_dir, source, tmp_path / "o.jsonl", "on_bad_row=skip")["scored"] == 1
    first, second = read_jsonl(tmp_path / "o.jsonl")
    assert first["input"] == rows[0] and first["reward"] == len("p|r") and first["text"] == "p|r"
    assert second["input"] == rows[1] and "empty response" in second["error"]


# ------------------------------------------------------------------- any value passes through

VALUES = {
    "day": datetime.date(2024, 2, 29),
    "moment": datetime.datetime(2024, 2, 29, 12, 30, 1, 500, tzinfo=datetime.timezone.utc),
    "price": Decimal("12.50"),
    "blob": b"\x00\xffraw",
    "tags": ["a", "b"],
    "meta": {"source": "web", "scores": [1.5, 2.5]},
    "count": 2**62,
    "missing": None,
    "ratio": float("nan"),
    "limit": float("inf"),
}


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_values_of_any_type_pass_through_into_the_output(suffix, fake, tmp_path, cache_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "p", "response": f"r{i}", **VALUES} for i in range(3)]
    rows.append({"prompt": "p", "response": " ", **VALUES})  # an error row keeps its values too
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    output = tmp_path / f"out{suffix}"
    counts = run_score(tmp_path, cache_dir, tmp_path / "in.parquet", output, "on_bad_row=skip")
    assert counts == {"rows": 4, "scored": 3, "errors": 1}
    if suffix == ".parquet":
        out = pq.read_table(output).to_pylist()
        same = [{k: o[k] for k in VALUES if k not in ("ratio", "limit")} for o in out]
        assert all(o == {k: v for k, v in VALUES.items() if k not in ("ratio", "limit")} for o in same)  # types kept
        assert math.isnan(out[0]["ratio"]) and out[0]["limit"] == float("inf")
        assert [o["response"] for o in out] == ["r0", "r1", "r2", " "] and out[3]["reward"] is None
    elif suffix == ".jsonl":
        out = read_jsonl(output)
        assert out[0]["day"] == "2024-02-29" and out[0]["moment"] == "2024-02-29T12:30:01.000500+00:00"
        assert out[0]["price"] == "12.50" and out[0]["meta"] == VALUES["meta"] and out[3]["count"] == 2**62
        assert "error" in out[3] and out[3]["tags"] == ["a", "b"]
        assert (out[0]["ratio"], out[0]["limit"]) == ("nan", "inf")  # valid JSON: no NaN or Infinity
        assert "NaN" not in output.read_text() and "Infinity" not in output.read_text()
    else:
        with open(output, newline="", encoding="utf-8") as f:
            out = list(csv.DictReader(f))
        assert len(out) == 4 and out[0]["day"] == "2024-02-29" and out[0]["price"] == "12.50"
        assert json.loads(out[0]["meta"]) == VALUES["meta"] and out[0]["missing"] == "" and out[3]["error"]


def test_invalid_text_in_an_error_row_is_written_escaped_not_crashed(fake, tmp_path, cache_dir):
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "\\ud800 and \\u0000", "response": "r"}\n' + GOOD["single"](1) + "\n")
    for suffix in (".jsonl", ".csv", ".parquet"):
        counts = run_score(tmp_path, cache_dir, source, tmp_path / f"o{suffix}", "on_bad_row=skip")
        assert counts == {"rows": 2, "scored": 1, "errors": 1}
    first = read_jsonl(tmp_path / "o.jsonl")[0]
    assert first["prompt"] == "\ud800 and \x00" and "field 'prompt': contains" in first["error"]


def test_a_csv_input_with_a_bom_keeps_its_column_names(fake, tmp_path, cache_dir):
    source = tmp_path / "sheet.csv"
    source.write_bytes(b"\xef\xbb\xbfprompt,response\r\nIs 4 even?,yes\r\n")
    run_score(tmp_path, cache_dir, source, tmp_path / "o.csv")
    with open(tmp_path / "o.csv", newline="", encoding="utf-8") as f:
        (row,) = csv.DictReader(f)
    assert row["prompt"] == "Is 4 even?" and row["text"] == "Is 4 even?|yes"


# ------------------------------------------------------------------------------ with a real model


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A tiny decoder trained for 30 steps and exported."""
    run = tmp_path_factory.mktemp("run")
    overrides = ["logger=none", "trainer.max_steps=30", "trainer.limit_val_batches=4", "test=false"]
    train(compose_config("train", [*overrides, "~callbacks.progress_bar"], run, cache_dir))
    folder = run / "export"
    ckpt = run / "checkpoints" / "last.ckpt"
    export(compose_config("export", [f"ckpt_path={ckpt}", f"output_dir={folder}"], run / "x", cache_dir))
    return folder


def quiz_rows(n: int) -> list[dict]:
    return [json.loads(line) for line in (QUIZ / "test.jsonl").read_text().splitlines()[:n]]


def test_scoring_pairs_and_bad_rows(exported, tmp_path, cache_dir):
    rows = [json.dumps(r) for r in quiz_rows(2)] + [
        '{"prompt": "p", "response": ""}',
        "{broken",
        json.dumps({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}),
        "",
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(rows) + "\n")
    common = [f"model_dir={exported}", f"input={tmp_path / 'in.jsonl'}", f"output={tmp_path / 'o.jsonl'}"]
    with pytest.raises(Exception, match=r"in\.jsonl:3: field 'response': empty response"):
        score_file(compose_config("score", common, tmp_path / "s", cache_dir))
    counts = score_file(compose_config("score", [*common, "on_bad_row=skip"], tmp_path / "s", cache_dir))
    assert counts == {"rows": 6, "scored": 2, "errors": 4}
    out = read_jsonl(tmp_path / "o.jsonl")
    assert set(out[0]["reward"]) == {"chosen", "rejected"} and out[0]["prompt"] == quiz_rows(1)[0]["prompt"]
    assert "empty response" in out[2]["error"] and "invalid JSON" in out[3]["error"]
    assert "in.jsonl:5: field 'chosen': expected a string, got list" in out[4]["error"]
    assert "in.jsonl:6: blank line" in out[5]["error"]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_every_output_format_holds_the_same_rewards(suffix, exported, tmp_path, cache_dir):
    import pyarrow.parquet as pq

    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in quiz_rows(6)))
    common = [f"model_dir={exported}", f"input={tmp_path / 'in.jsonl'}"]
    for out in ("o.jsonl", f"o{suffix}"):
        score_file(compose_config("score", [*common, f"output={tmp_path / out}"], tmp_path / "s", cache_dir))
    expected = [o["reward"]["chosen"] for o in read_jsonl(tmp_path / "o.jsonl")]
    if suffix == ".parquet":
        got = [o["reward"]["chosen"] for o in pq.read_table(tmp_path / "o.parquet").to_pylist()]
    else:
        with open(tmp_path / "o.csv", newline="", encoding="utf-8") as f:
            got = [json.loads(o["reward"])["chosen"] for o in csv.DictReader(f)]
    assert np.allclose(got, expected)
