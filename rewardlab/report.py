"""Compare the jobs of a multirun: `python -m rewardlab.report <multirun folder> [logger=wandb]`
(`rewardlab-report`).

Jobs are grouped by every override that varies across the sweep except `seed`; each group gets its
number of seeds, the mean and 95% CI of the held-out accuracy (test, else val best) and of the loss,
wall time and speed, and a paired comparison with the best group on the same test pairs (see
`rewardlab.stats`). Writes `report.md`, `report.csv` (one row of plain numbers per group),
`report.json` and `report.png` into the folder. A job without `results.json` counts as failed, with
the last error line of its log, never a silent gap.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rewardlab.runfolder import atomic_output
from rewardlab.stats import Paired, mean_ci, paired_bootstrap

SEED = "seed"
UNSET = "(unset)"  # a key a job's command line did not set
# per group: mean and 95% CI over seeds; the length and uncertainty ones show only where a group has them
METRICS = ("acc", "loss", "wall_s", "pairs_per_s", "trainable", "acc_lc", "length_corr", "auroc", "margin_auroc")


OPTIONAL = {"acc_lc": "length-controlled acc", "length_corr": "reward–length corr", "auroc": "uncertainty AUROC",
            "margin_auroc": "|margin| AUROC"}  # fmt: skip


def headline(acc_key: str) -> dict[str, str]:
    """The results.json key of each headline metric: held-out means test when the jobs were tested."""
    split = "test" if acc_key == "test/acc" else "val"
    return {"acc": acc_key, "acc_lc": f"{split}/acc_length_controlled", "length_corr": f"{split}/length_reward_corr",
            "auroc": "test/uncertainty_auroc", "margin_auroc": "test/margin_auroc", "loss": f"{split}/loss",
            "wall_s": "wall_s",
            "pairs_per_s": "train/pairs_per_s", "trainable": "params/trainable"}  # fmt: skip


class ReportError(ValueError):
    """A sweep folder the report cannot read as it is (the message names the file)."""


@dataclass
class Job:
    folder: Path
    overrides: dict[str, str]
    results: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    read_pairs: dict[str, int] | None = field(default=None, repr=False)  # test_pairs.csv, once read

    @property
    def ok(self) -> bool:
        return bool(self.results)

    def test_pairs(self) -> dict[str, int]:
        """`read_test_pairs`, read once: the best group's files serve every comparison."""
        if self.read_pairs is None:
            self.read_pairs = read_test_pairs(self)
        return self.read_pairs

    @property
    def seed(self) -> str:
        return next((v for k, v in self.overrides.items() if is_seed(k)), "default")

    def value(self, key: str) -> float:
        """A result as a finite float, NaN when missing or not a number (a string, a bool, 10**400)."""
        v = self.results.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return math.nan
        try:
            x = float(v)
        except OverflowError:
            return math.nan
        return x if math.isfinite(x) else math.nan


def is_seed(key: str) -> bool:
    return key.lstrip("+~") == SEED


ERROR_LINE = re.compile(r"\b\w*(Error|Exception)\b|\berror:|\[ERROR\]")


def _last_error(folder: Path) -> str:
    """The last line that reports an error (`...Error`, `...Exception`, `error:`, `[ERROR]`) in the job's logs."""
    errors = []
    for log in sorted(p for p in folder.glob("*.log") if p.is_file() and not p.is_symlink()):
        errors += [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ERROR_LINE.search(ln)]
    return errors[-1][-200:] if errors else "no results.json (the job failed or is still running)"


def load_jobs(sweep_dir: Path) -> list[Job]:
    """Every job folder (one holding `.hydra/overrides.yaml`) under `sweep_dir`, in job order."""
    if not sweep_dir.is_dir():
        raise ReportError(f"{sweep_dir}: no such folder (a multirun folder, hydra.sweep.dir)")
    jobs = []
    for path in sorted(sweep_dir.rglob(".hydra/overrides.yaml"), key=lambda p: _job_order(p.parent.parent, sweep_dir)):
        folder = path.parent.parent
        listed = _read(path, lambda text: yaml.safe_load(text) or [])
        if not isinstance(listed, list) or not all(isinstance(o, str) for o in listed):
            raise ReportError(f"{path}: expected a list of key=value overrides, as Hydra writes")
        overrides = dict(o.split("=", 1) if "=" in o else (o, "") for o in listed)
        results_file = folder / "results.json"
        if not results_file.exists():
            jobs.append(Job(folder, overrides, error=_last_error(folder)))
            continue
        results = _read(results_file, json.loads)
        if not isinstance(results, dict) or not results:
            raise ReportError(f"{results_file}: expected a JSON object of results")
        jobs.append(Job(folder, overrides, results))
    return jobs


def _read(path: Path, parse: Any) -> Any:
    """`parse` of a file's UTF-8 text, or a `ReportError` naming the file and what is wrong with it."""
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise ReportError(f"{path}: cannot be read as {path.suffix[1:]} ({type(e).__name__}: {str(e)[:200]})") from None


def _job_order(folder: Path, root: Path) -> tuple:
    """Numeric folder names in numeric order, before other names (Hydra numbers a sweep's jobs)."""
    return tuple((0, int(p), "") if p.isascii() and p.isdigit() else (1, 0, p) for p in folder.relative_to(root).parts)


def varied(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs between jobs (or is missing in some), in first-seen order."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job.overrides if k not in keys]
    return [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]


ROW = re.compile(r"[0-9]{1,18}")  # a pair row's number
PAIR = re.compile(
    r"[0-9]{1,18}(?::[0-9]{1,9}>[0-9]{1,9}|>[0-9]{1,18})"
)  # a ranking's `row:i>j`, two ratings' `row>row`


def read_test_pairs(job: Job) -> dict[str, int]:
    """A job's `test_pairs.csv` (written by training): test pair (its row, or for pairs made of rankings or
    ratings its responses) → 1 if the chosen response won. Checked:
    inside the job folder, no row twice, and its accuracy is the job's `test/acc`."""
    name = job.results.get("test/pairs_file", "test_pairs.csv")
    path = job.folder / str(name)
    if path.parent != job.folder or path.is_symlink() or not path.is_file():
        return {}
    outcomes: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8", errors="strict") as f:
        try:
            reader = csv.reader(f)
            header = next(reader, None)
            if header not in (["row", "correct", "margin"], ["pair", "correct", "margin"]):
                raise ReportError(f"{path}:1: expected the header row,correct,margin (or pair,correct,margin)")
            key, what = (ROW, "a row number") if header[0] == "row" else (PAIR, "a pair (row:i>j or row>row)")
            for line, fields in enumerate(reader, start=2):
                if (len(fields) != 3 or not key.fullmatch(fields[0])
                        or fields[1] not in ("0", "1") or not _is_number(fields[2])):  # fmt: skip
                    raise ReportError(f"{path}:{line}: expected {what}, 0 or 1, and a margin; got {fields[:3]}")
                if fields[0] in outcomes:
                    raise ReportError(f"{path}:{line}: {header[0]} {fields[0]} again (each test pair is listed once)")
                outcomes[fields[0]] = int(fields[1])
        except (UnicodeDecodeError, csv.Error) as e:
            raise ReportError(f"{path}: not a UTF-8 CSV file ({type(e).__name__})") from None
    acc = job.value("test/acc")
    if outcomes and math.isfinite(acc) and abs(sum(outcomes.values()) / len(outcomes) - acc) > 1e-6:
        raise ReportError(
            f"{path}: its pairs give accuracy {sum(outcomes.values()) / len(outcomes):.6f}, but results.json says "
            f"test/acc {acc:.6f}: they are not from the same test"
        )
    return outcomes


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


@dataclass
class Group:
    overrides: dict[str, str]
    jobs: list[Job]
    stats: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # metric -> mean, low, high
    vs_best: Paired | None = None
    why_no_test: str = ""
    is_best: bool = False
    acc_key: str = "test/acc"

    @property
    def ok(self) -> list[Job]:
        """The jobs that finished with a numeric held-out accuracy: the group's seeds."""
        return [j for j in self.jobs if j.ok and math.isfinite(j.value(self.acc_key))]


def group_jobs(jobs: list[Job], acc_key: str = "test/acc") -> list[Group]:
    """One group per combination of the varying overrides other than `seed`, in first-job order."""
    keys = [k for k in varied(jobs) if not is_seed(k)]
    groups: dict[tuple, Group] = {}
    for job in jobs:
        key = tuple(job.overrides.get(k, UNSET) for k in keys)
        groups.setdefault(key, Group(dict(zip(keys, key)), [], acc_key=acc_key)).jobs.append(job)
    for group in groups.values():
        group.stats = {m: mean_ci([j.value(key) for j in group.ok]) for m, key in headline(acc_key).items()}
    return list(groups.values())


def compare(group: Group, best: Group) -> tuple[Paired | None, str]:
    """The paired test of `group` against `best` on the test pairs every job of both was scored on."""
    jobs = group.ok + best.ok
    if group is best or not group.ok:
        return None, ""
    hashes = {str(j.results.get("test/data_hash")) for j in jobs}
    if "None" in hashes or len(hashes) > 1:
        return None, "no paired test: the jobs were not all tested on the same test data"
    outcomes = [j.test_pairs() for j in jobs]
    if missing := [j.folder.name for j, o in zip(jobs, outcomes) if not o]:
        return None, f"no paired test: job {', '.join(missing)} has no test_pairs.csv"
    shared = sorted(set.intersection(*(set(o) for o in outcomes)))
    if not shared:
        return None, "no paired test: no test pair every job was scored on"
    matrix = np.array([[o[r] for r in shared] for o in outcomes], dtype=float)
    a, b = matrix[: len(group.ok)], matrix[len(group.ok) :]
    seeds_a, seeds_b = [j.seed for j in group.ok], [j.seed for j in best.ok]
    paired = sorted(seeds_a) == sorted(seeds_b) and len(set(seeds_a)) == len(seeds_a)
    if paired:
        a, b = a[np.argsort(seeds_a)], b[np.argsort(seeds_b)]
    return paired_bootstrap(a, b, seeds_paired=paired), ""


def summarize(jobs: list[Job]) -> tuple[str, list[Group]]:
    """The accuracy key used (test/acc when every finished job has it, else val/acc_best), and the groups
    with their paired comparison against the best one (none when no group has an accuracy)."""
    finished = [j for j in jobs if j.ok]
    untested = [j.folder.name for j in finished if "test/acc" not in j.results]
    metric = "test/acc" if finished and not untested else "val/acc_best"
    groups = group_jobs(jobs, metric)
    ranked = [g for g in groups if g.ok]
    if not ranked:
        return metric, groups
    best = max(ranked, key=lambda g: g.stats["acc"][0])
    for group in groups:
        if metric == "test/acc":
            group.vs_best, group.why_no_test = compare(group, best)
        elif group is not best:
            why = "no test split" if len(untested) == len(finished) else f"job {', '.join(untested)} has no test/acc"
            group.vs_best, group.why_no_test = None, f"no paired test: {why}"
    best.is_best = True
    return metric, groups


def _num(job: Job, key: str, digits: int = 4) -> str:
    value = job.value(key)
    return f"{value:.{digits}g}" if math.isfinite(value) else ""


def _interval(stat: tuple[float, float, float], digits: int = 3) -> str:
    mean, low, high = stat
    if not math.isfinite(mean):
        return ""
    if not math.isfinite(low):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def cell(text: str) -> str:
    """Text as one Markdown table cell: no line breaks, `|` escaped, no raw HTML."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def group_table(groups: list[Group]) -> tuple[list[str], list[list[str]]]:
    keys = list(groups[0].overrides) if groups else []
    shown = {m: any(math.isfinite(g.stats[m][0]) for g in groups) for m in OPTIONAL}
    header = [*keys, "seeds", "failed", "acc (95% CI)", "Δ vs best, points (95% CI)", "p vs best", "pairs",
              *(name for m, name in OPTIONAL.items() if shown[m]), "loss", "wall s", "pairs/s",
              "trainable params"]  # fmt: skip
    rows = []
    for g in groups:
        d = g.vs_best
        if d is not None:
            diff = f"{d.diff * 100:+.1f} [{d.ci_low * 100:+.1f}, {d.ci_high * 100:+.1f}]"
            p, pairs = f"{d.p:.2g}", str(d.pairs)
        else:
            diff, p, pairs = ("best" if g.is_best else "", g.why_no_test, "")
        trainable = f"{g.stats['trainable'][0]:,.0f}" if math.isfinite(g.stats["trainable"][0]) else ""
        rows.append([*g.overrides.values(), str(len(g.ok)), str(len(g.jobs) - len(g.ok)), _interval(g.stats["acc"]),
                     diff, p, pairs, *(_interval(g.stats[m], 2 if m == "length_corr" else 3) for m in OPTIONAL
                                       if shown[m]), _interval(g.stats["loss"]),
                     _interval(g.stats["wall_s"], 1), _interval(g.stats["pairs_per_s"], 1), trainable])  # fmt: skip
    return header, rows


def job_table(jobs: list[Job], root: Path) -> tuple[list[str], list[list[str]]]:
    keys = varied(jobs)
    header = ["job", *keys, "status", "val acc best", "test acc", "wall s"]
    rows = []
    for job in jobs:
        status = "ok" if job.ok else f"failed: {job.error}"
        values = [_num(job, k) for k in ("val/acc_best", "test/acc", "wall_s")]
        rows.append([str(job.folder.relative_to(root)), *(job.overrides.get(k, UNSET) for k in keys), status, *values])
    return header, rows


def as_json(metric: str, groups: list[Group]) -> dict[str, Any]:
    def number(x: float) -> float | None:
        return x if x is not None and math.isfinite(x) else None

    out = []
    for g in groups:
        mean, low, high = g.stats["acc"]
        d = g.vs_best
        out.append({
            "overrides": g.overrides, "n": len(g.ok), "failed": len(g.jobs) - len(g.ok),
            "mean": number(mean), "ci_low": number(low), "ci_high": number(high),
            "best": g.is_best,
            "diff_vs_best": number(d.diff) if d else (0.0 if g.is_best else None),
            "diff_ci_low": number(d.ci_low) if d else None, "diff_ci_high": number(d.ci_high) if d else None,
            "p_vs_best": number(d.p) if d else None, "paired_pairs": d.pairs if d else None,
            "note": g.why_no_test or None,
            "metrics": {m: dict(zip(("mean", "ci_low", "ci_high"), map(number, s))) for m, s in g.stats.items()},
            "jobs": [{"folder": j.folder.name, "seed": j.seed, "ok": j.ok, "error": j.error or None,
                      "acc": number(j.value(metric))} for j in g.jobs],
        })  # fmt: skip
    return {"metric": metric, "test": "paired bootstrap over test pairs and seeds (rewardlab.stats)", "groups": out}


def csv_text(groups: list[Group]) -> str:
    keys = list(groups[0].overrides) if groups else []
    f = io.StringIO()
    out = csv.writer(f)
    out.writerow([*keys, "n", "failed", *(f"{m}_{s}" for m in METRICS for s in ("mean", "ci_low", "ci_high")),
                  "diff_vs_best", "diff_ci_low", "diff_ci_high", "p_vs_best", "paired_pairs"])  # fmt: skip
    for g in groups:
        d = g.vs_best
        paired = [d.diff, d.ci_low, d.ci_high, d.p, d.pairs] if d else [math.nan] * 5
        values = [v for m in METRICS for v in g.stats[m]] + paired
        out.writerow([*g.overrides.values(), len(g.ok), len(g.jobs) - len(g.ok),
                      *("" if not math.isfinite(v) else repr(float(v)) for v in values)])  # fmt: skip
    return f.getvalue()


def report(sweep_dir: Path, logger: str = "none") -> str:
    """Write report.md, report.csv, report.json and report.png into `sweep_dir`; return the markdown."""
    from rewardlab.report_plot import plot

    jobs = load_jobs(sweep_dir)
    if not jobs:
        raise ReportError(f"{sweep_dir}: no job folders (with .hydra/overrides.yaml) found")
    metric, groups = summarize(jobs)
    seeds = sorted({len(g.ok) for g in groups if g.ok}) or [0]
    ranked = "" if any(g.is_best for g in groups) else f" No job has a numeric `{metric}`: nothing is ranked."
    text = (
        f"Held-out accuracy: `{metric}`, mean over seeds with its 95% CI (Student's t); Δ and p: paired bootstrap "
        f"against the best group over the test pairs both were scored on (`pairs`) and the seeds ({len(jobs)} jobs, "
        f"{'/'.join(map(str, seeds))} seeds per group).{ranked}\n\n" + markdown(*group_table(groups))
    )
    jobs_md = markdown(*job_table(jobs, sweep_dir))
    summary = as_json(metric, groups)
    for name, content in (
        ("report.md", f"# {cell(sweep_dir.name)}\n\n{text}\n## Jobs\n\n{jobs_md}"),
        ("report.csv", csv_text(groups)),
        ("report.json", json.dumps(summary, indent=1) + "\n"),
    ):
        with atomic_output(sweep_dir / name) as tmp:
            tmp.write_text(content)
    with atomic_output(sweep_dir / "report.png") as tmp:
        plot(metric, groups, tmp)
    if logger == "wandb":
        from rewardlab.report_plot import log_to_wandb

        log_to_wandb(sweep_dir, summary, *group_table(groups))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder (hydra.sweep.dir)")
    parser.add_argument("settings", nargs="*", help="logger=wandb: also log the table and plot to a wandb run")
    args = parser.parse_args()
    logger = "none"
    for setting in args.settings:
        key, _, value = setting.partition("=")
        if key != "logger" or value not in ("none", "wandb"):
            parser.error(f"unknown setting {setting!r}; expected logger=wandb or logger=none")
        logger = value
    try:
        text = report(args.sweep_dir, logger)
    except ReportError as e:
        raise SystemExit(f"error: {e}") from None
    print(text, end="")
    print(f"\nwrote {args.sweep_dir / 'report.md'}, report.csv, report.json, report.png")


if __name__ == "__main__":
    main()
