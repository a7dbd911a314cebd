"""Compare the jobs of a multirun: `python -m rewardlab.report <multirun folder>` (`rewardlab-report`).

Reads each job's `.hydra/overrides.yaml` and `results.json`, finds the options that vary across
jobs, prints one row per job and writes `report.md`, `report.csv` and `report.png` (accuracy
against trainable parameters and against wall time) into the folder. A job without
`results.json` is a failed row, with the last error line of its log, never a silent gap.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

COLUMNS = [
    ("val/acc_best", "val acc best", "{:.4f}"),
    ("test/acc", "test acc", "{:.4f}"),
    ("params/trainable", "trainable params", "{:,.0f}"),
    ("wall_s", "wall s", "{:.1f}"),
    ("train/pairs_per_s", "pairs/s", "{:.1f}"),
]


@dataclass
class Job:
    folder: Path
    overrides: dict[str, str]
    results: dict[str, float] = field(default_factory=dict)
    error: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.results)


def _last_error(folder: Path) -> str:
    for log in sorted(folder.glob("*.log")):
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error" in ln or "error" in ln or "Exception" in ln]
        if errors:
            return errors[-1][-200:]
    return "no results.json (the job failed or is still running)"


def load_jobs(sweep_dir: Path) -> list[Job]:
    """Every job folder (one holding `.hydra/overrides.yaml`) under `sweep_dir`, in job order."""
    jobs = []
    for path in sorted(sweep_dir.rglob(".hydra/overrides.yaml"), key=lambda p: _job_order(p.parent.parent, sweep_dir)):
        folder = path.parent.parent
        overrides = dict(o.split("=", 1) if "=" in o else (o, "") for o in yaml.safe_load(path.read_text()) or [])
        results_file = folder / "results.json"
        if results_file.exists():
            jobs.append(Job(folder, overrides, json.loads(results_file.read_text())))
        else:
            jobs.append(Job(folder, overrides, error=_last_error(folder)))
    return jobs


def _job_order(folder: Path, root: Path) -> tuple:
    return tuple(int(p) if p.isdigit() else math.inf for p in folder.relative_to(root).parts) + (str(folder),)


def varied(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs between jobs (or is missing in some), in first-seen order."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job.overrides if k not in keys]
    return [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]


def table(jobs: list[Job]) -> tuple[list[str], list[list[str]]]:
    keys = varied(jobs)
    header = ["job", *keys, "status", *(title for _, title, _ in COLUMNS)]
    rows = []
    for job in jobs:
        values = [fmt.format(job.results[k]) if k in job.results else "" for k, _, fmt in COLUMNS]
        status = "ok" if job.ok else f"failed: {job.error}"
        rows.append([job.folder.name, *(job.overrides.get(k, "") for k in keys), status, *values])
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(jobs: list[Job], path: Path) -> None:
    """Accuracy against trainable parameters (log scale) and against wall time, one marker per job."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = varied(jobs) or ["job"]
    ok = [j for j in jobs if j.ok]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = "osD^vP*Xh<>p"
    for i, job in enumerate(ok):
        label = ", ".join(f"{k}={job.overrides.get(k, '')}" for k in keys) if keys != ["job"] else job.folder.name
        acc = job.results.get("test/acc", job.results.get("val/acc_best", math.nan))
        for ax, x in zip(axes, (job.results["params/trainable"], job.results["wall_s"])):
            ax.scatter(x, acc, marker=markers[i % len(markers)], s=70, label=label)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("trainable parameters")
    axes[1].set_xlabel("wall time (s)")
    for ax in axes:
        ax.set_ylabel("held-out accuracy (test, else val best)")
        ax.grid(alpha=0.3)
    failed = len(jobs) - len(ok)
    fig.suptitle(f"{path.parent.name}: {len(ok)} jobs" + (f", {failed} failed" if failed else ""))
    axes[1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(sweep_dir: Path) -> str:
    """Write report.md, report.csv and report.png into `sweep_dir`; return the markdown table."""
    jobs = load_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir}: no job folders (with .hydra/overrides.yaml) found")
    header, rows = table(jobs)
    text = markdown(header, rows)
    (sweep_dir / "report.md").write_text(f"# {sweep_dir.name}\n\n{text}")
    with open(sweep_dir / "report.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    plot(jobs, sweep_dir / "report.png")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder (hydra.sweep.dir)")
    args = parser.parse_args()
    print(report(args.sweep_dir), end="")
    print(f"\nwrote {args.sweep_dir / 'report.md'}, report.csv, report.png")


if __name__ == "__main__":
    main()
