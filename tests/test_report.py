"""The sweep report on sweep folders written here with known outcomes: seeds merged into groups,
other axes kept, known means, intervals and paired tests, and clear refusals of unreadable files."""

from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path

import pytest

from rewardlab.report import ReportError, load_jobs, report, summarize
from rewardlab.report_plot import axis, short

from .test_train import run_cli


def write_job(folder: Path, overrides: list[str], correct: list[int] | None, **results) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {json.dumps(o)}\n" for o in overrides))
    if correct is None:
        (folder / "train.log").write_text("[INFO] start\n[ERROR] run failed: DataError: bad row 3\n")
        return
    (folder / "test_pairs.csv").write_text(
        "row,correct,margin\n" + "".join(f"{i + 1},{c},{c - 0.5}\n" for i, c in enumerate(correct))
    )
    base = {
        "test/acc": sum(correct) / len(correct),
        "test/loss": 0.6,
        "wall_s": 10.0,
        "train/pairs_per_s": 50.0,
        "params/trainable": 100,
        "val/acc_best": 0.5,
        "test/data_hash": "h",
        "test/pairs_file": "test_pairs.csv",
    }
    (folder / "results.json").write_text(json.dumps(base | results))


def sweep_of(root: Path, jobs: list[tuple[list[str], list[int] | None]], **results) -> Path:
    for i, (overrides, correct) in enumerate(jobs):
        write_job(root / str(i), overrides, correct, **results)
    return root


def right(k: int, n: int = 100) -> list[int]:
    return [1] * k + [0] * (n - k)


def test_seeds_merge_and_every_other_axis_stays(tmp_path):
    jobs = [([f"freeze={f}", f"optimizer.lr={lr}", f"seed={s}"], right(60 + s)) for f in ("full", "lora")
            for lr in ("1e-4", "1e-3") for s in (1, 2)]  # fmt: skip
    _, groups = summarize(load_jobs(sweep_of(tmp_path, jobs)))
    assert [g.overrides for g in groups] == [
        {"freeze": f, "optimizer.lr": lr} for f in ("full", "lora") for lr in ("1e-4", "1e-3")
    ]
    assert all(len(g.ok) == 2 and sorted(j.seed for j in g.ok) == ["1", "2"] for g in groups)
    assert groups[0].stats["acc"][0] == pytest.approx(0.615)


def test_known_outcomes_give_known_means_intervals_and_tests(tmp_path):
    jobs = [(["freeze=full", f"seed={s}"], right(k)) for s, k in ((1, 80), (2, 82), (3, 84))]
    jobs += [(["freeze=head_only", f"seed={s}"], right(k)) for s, k in ((1, 50), (2, 52), (3, 54))]
    sweep = sweep_of(tmp_path, jobs)
    text = report(sweep)
    data = json.loads((sweep / "report.json").read_text())
    assert data["metric"] == "test/acc"
    full, head = data["groups"]
    half = 4.302652729911275 * 0.02 / math.sqrt(3)
    assert full["n"] == 3 and full["mean"] == pytest.approx(0.82) and full["ci_low"] == pytest.approx(0.82 - half)
    assert full["diff_vs_best"] == 0.0 and full["p_vs_best"] is None
    assert head["diff_vs_best"] == pytest.approx(-0.30) and head["p_vs_best"] < 0.001 and head["paired_pairs"] == 100
    assert head["diff_ci_high"] < -0.2 and [j["seed"] for j in head["jobs"]] == ["1", "2", "3"]
    assert "| full | 3 | 0 | 0.820 [" in text and "| best |" in text and "| head_only | 3 | 0 | 0.520 [" in text
    rows = list(csv.DictReader(open(sweep / "report.csv")))
    assert [r["freeze"] for r in rows] == ["full", "head_only"]
    assert float(rows[1]["acc_mean"]) == pytest.approx(0.52) and float(rows[1]["diff_vs_best"]) == pytest.approx(-0.3)
    assert (sweep / "report.png").stat().st_size > 10_000 and "## Jobs" in (sweep / "report.md").read_text()


def test_failed_jobs_are_counted_in_their_group(tmp_path):
    jobs = [
        (["freeze=full", "seed=1"], right(70)),
        (["freeze=full", "seed=2"], None),
        (["freeze=lora", "seed=1"], None),
    ]
    sweep = sweep_of(tmp_path, jobs)
    text = report(sweep)
    assert "| full | 1 | 1 | 0.700 |" in text and "| lora | 0 | 1 |" in text
    assert "failed: [ERROR] run failed: DataError: bad row 3" in (sweep / "report.md").read_text()


def test_no_paired_test_across_different_test_data(tmp_path):
    write_job(tmp_path / "0", ["freeze=full"], right(80), **{"test/data_hash": "one"})
    write_job(tmp_path / "1", ["freeze=lora"], right(70), **{"test/data_hash": "two"})
    _, groups = summarize(load_jobs(tmp_path))
    assert groups[1].vs_best is None and "not all tested on the same test data" in groups[1].why_no_test


def test_pairs_are_matched_by_row_and_only_shared_rows_count(tmp_path):
    write_job(tmp_path / "0", ["freeze=full"], right(80))
    write_job(tmp_path / "1", ["freeze=lora"], right(60), **{"test/acc": 60 / 90})
    (tmp_path / "1" / "test_pairs.csv").write_text(
        "row,correct,margin\n" + "".join(f"{i + 1},{int(i < 60)},0.1\n" for i in reversed(range(90)))
    )
    _, groups = summarize(load_jobs(tmp_path))
    assert groups[1].vs_best.pairs == 90 and groups[1].vs_best.diff == pytest.approx(60 / 90 - 80 / 90)


def test_without_a_test_split_the_report_uses_val_best(tmp_path):
    for i, (f, acc) in enumerate((("full", 0.8), ("lora", 0.7))):
        (tmp_path / str(i) / ".hydra").mkdir(parents=True)
        (tmp_path / str(i) / ".hydra" / "overrides.yaml").write_text(f"- freeze={f}\n")
        (tmp_path / str(i) / "results.json").write_text(json.dumps({"val/acc_best": acc, "wall_s": 1.0}))
    metric, groups = summarize(load_jobs(tmp_path))
    assert metric == "val/acc_best" and groups[0].stats["acc"][0] == 0.8 and groups[0].is_best
    assert groups[1].why_no_test == "no paired test: no test split"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("results.json", "{not json", "results.json: cannot be read as json"),
        ("results.json", "[]", "results.json: expected a JSON object"),
        ("test_pairs.csv", "row,correct,margin\n1,1,0.5\n2,yes,0.1\n", "test_pairs.csv:3: expected a row number"),
        ("test_pairs.csv", "a,b\n", "test_pairs.csv:1: expected the header"),
        ("test_pairs.csv", "row,correct,margin\n²,1,0.5\n", "test_pairs.csv:2: expected a row number"),
        (".hydra/overrides.yaml", "freeze: full\n", "overrides.yaml: expected a list"),
    ],
)
def test_unreadable_files_are_refused_naming_them(tmp_path, name, content, message):
    sweep = sweep_of(tmp_path, [(["freeze=full"], right(80)), (["freeze=lora"], right(70))])
    (sweep / "1" / name).write_text(content)
    with pytest.raises(ReportError, match=message.replace(".", r"\.")):
        report(sweep)


def test_a_pairs_file_outside_the_job_folder_is_not_read(tmp_path):
    sweep = sweep_of(tmp_path, [(["freeze=full"], right(80)), (["freeze=lora"], right(70))])
    results = json.loads((sweep / "1" / "results.json").read_text())
    (sweep / "1" / "results.json").write_text(json.dumps(results | {"test/pairs_file": "../0/test_pairs.csv"}))
    _, groups = summarize(load_jobs(sweep))
    assert groups[1].vs_best is None and groups[1].why_no_test == "no paired test: job 1 has no test_pairs.csv"


def test_the_plot_axis_follows_what_was_swept(tmp_path):
    def groups(*overrides: str):
        jobs = [([o, f"seed={s}"], right(70)) for o in overrides for s in (1, 2)]
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        return summarize(load_jobs(sweep_of(folder, jobs)))[1]

    assert axis(groups("optimizer.lr=1e-05", "optimizer.lr=0.0001", "optimizer.lr=0.001")) == (
        "optimizer.lr", [1e-5, 1e-4, 1e-3], ["1e-05", "0.0001", "0.001"], True)  # fmt: skip
    assert axis(groups("data.batch_size=8", "data.batch_size=16"))[3] is False  # numeric, under 10×: linear
    assert axis(groups("freeze=full", "freeze=lora"))[:3] == ("freeze", [0, 1], ["full", "lora"])
    assert short("3.0") == "3" and short("full") == "full"


def test_the_cli_prints_the_groups_and_refuses_unknown_settings(tmp_path):
    sweep = sweep_of(tmp_path / "s", [(["freeze=full"], right(80)), (["freeze=lora"], right(70))])
    done = run_cli(str(sweep), module="rewardlab.report")
    assert done.returncode == 0 and "| lora | 1 | 0 | 0.700 | -10.0 [" in done.stdout
    bad = run_cli(str(sweep), "logger=tensorboard", module="rewardlab.report")
    assert bad.returncode != 0 and "expected logger=wandb or logger=none" in bad.stderr
    missing = run_cli(str(tmp_path / "nothing"), module="rewardlab.report")
    assert (
        missing.returncode == 1
        and missing.stderr.strip().startswith("error: ")
        and "nothing: no such folder" in missing.stderr
    )


def test_the_report_logs_to_an_offline_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = sweep_of(tmp_path / "s", [(["freeze=full"], right(80)), (["freeze=lora"], right(70))])
    report(sweep, logger="wandb")
    runs = list(sweep.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    deadline = time.monotonic() + 60  # wandb-core's writer may close the file just after `finish` returns
    while runs[0].stat().st_size <= 1000 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert runs[0].stat().st_size > 1000
    assert os.environ["WANDB_MODE"] == "offline"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("test_pairs.csv", "row,correct,margin\n1,1,0.5\n1,0,0.5\n", "test_pairs.csv:3: row 1 again"),
        ("test_pairs.csv", "row,correct,margin\n" + "1" * 40 + ",1,0.5\n", "test_pairs.csv:2: expected a row number"),
        ("test_pairs.csv", "row,correct,margin\n1,1,abc\n", "test_pairs.csv:2: expected a row number"),
        ("test_pairs.csv", b"\xff\xfe\x00garbage", "test_pairs.csv: not a UTF-8 CSV file"),
        (
            ".hydra/overrides.yaml",
            "!!python/object/apply:os.system ['touch PWNED']\n",
            "overrides.yaml: cannot be read",
        ),
        (".hydra/overrides.yaml", b"\x80\x81", "overrides.yaml: cannot be read as yaml \\(UnicodeDecodeError"),
    ],
)
def test_hostile_files_are_one_clear_refusal(tmp_path, name, content, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = sweep_of(tmp_path / "s", [(["freeze=full"], right(80)), (["freeze=lora"], right(70))])
    target = sweep / "1" / name
    target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    with pytest.raises(ReportError, match=message.replace(".csv", r"\.csv").replace(".yaml", r"\.yaml")):
        report(sweep)
    assert not (tmp_path / "PWNED").exists()


def test_outcomes_that_disagree_with_results_are_refused(tmp_path):
    sweep = sweep_of(tmp_path, [(["freeze=full"], right(80)), (["freeze=lora"], right(70))])
    results = json.loads((sweep / "0" / "results.json").read_text())
    (sweep / "0" / "results.json").write_text(json.dumps(results | {"test/acc": 0.99}))
    with pytest.raises(ReportError, match=r"0/test_pairs\.csv: its pairs give accuracy 0\.800000, but results"):
        report(sweep)


def test_metrics_that_are_not_numbers_count_as_missing_never_crash(tmp_path):
    jobs = [(["freeze=full", "seed=1"], right(80)), (["freeze=full", "seed=2"], right(82)),
            (["freeze=lora", "seed=1"], right(70)), (["freeze=lora", "seed=2"], right(72))]  # fmt: skip
    sweep = sweep_of(tmp_path, jobs)
    for job, change in (("0", {"wall_s": "fast"}), ("1", {"wall_s": 10**400}), ("2", {"test/data_hash": [1]}),
                        ("3", {"test/acc": True})):  # fmt: skip
        results = json.loads((sweep / job / "results.json").read_text())
        (sweep / job / "results.json").write_text(json.dumps(results | change))
    text = report(sweep)
    assert "| full | 2 | 0 | 0.810 [" in text  # wall time unknown, accuracy fine
    assert "| lora | 1 | 1 | 0.700 |" in text  # the job whose test/acc is `true` has no accuracy: not a seed
    assert "not all tested on the same test data" in text


def test_when_no_job_has_an_accuracy_nothing_is_best(tmp_path):
    sweep = sweep_of(tmp_path, [(["freeze=full"], right(80)), (["freeze=lora"], right(70))], **{"test/acc": "n/a"})
    text = report(sweep)
    assert "| best |" not in text and "nothing is ranked" in text and "| full | 0 | 1 |" in text
    assert all(
        g["diff_vs_best"] is None and not g["best"] for g in json.loads((sweep / "report.json").read_text())["groups"]
    )


def test_one_untested_job_is_named_not_blamed_on_the_split(tmp_path):
    sweep = sweep_of(tmp_path, [(["freeze=full"], right(80)), (["freeze=lora"], right(70))])
    results = json.loads((sweep / "1" / "results.json").read_text())
    del results["test/acc"]
    (sweep / "1" / "results.json").write_text(json.dumps(results))
    metric, groups = summarize(load_jobs(sweep))
    assert metric == "val/acc_best" and groups[1].why_no_test == "no paired test: job 1 has no test/acc"


def test_links_are_neither_read_nor_written_through(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    sweep = sweep_of(tmp_path / "s", [(["freeze=full"], right(80)), (["freeze=lora"], right(70))])
    (sweep / "report.md").symlink_to(outside)
    (sweep / "1" / "test_pairs.csv").unlink()
    (sweep / "1" / "test_pairs.csv").symlink_to(sweep / "0" / "test_pairs.csv")
    _, groups = summarize(load_jobs(sweep))
    assert groups[1].why_no_test == "no paired test: job 1 has no test_pairs.csv"
    report(sweep)
    assert outside.read_text() == "keep me" and not (sweep / "report.md").is_symlink()


def test_nested_and_oddly_named_jobs_and_plus_seeds(tmp_path):
    sweep = sweep_of(tmp_path, [(["freeze=full", "+seed=1"], right(80)), (["freeze=full", "+seed=2"], right(82))])
    write_job(sweep / "0" / "inner", ["freeze=lora|x\n<b>", "+seed=1"], right(70))
    write_job(sweep / "extra", ["freeze=lora|x\n<b>", "+seed=2"], right(72))
    text = report(sweep)
    assert [g["n"] for g in json.loads((sweep / "report.json").read_text())["groups"]] == [2, 2]  # +seed is the seed
    assert "| lora\\|x &lt;b&gt; | 2 | 0 |" in text
    jobs = (sweep / "report.md").read_text().split("## Jobs")[1]
    assert jobs.index("| 0 |") < jobs.index("| 1 |") < jobs.index("| 0/inner |") < jobs.index("| extra |")
