"""The report's picture and its wandb copy: accuracy against whatever the sweep varied, with each
group's 95% CI and its seeds, a chance line, and a fixed y-range (noise never looks like a slope);
a cost panel (wall time, trainable parameters) only for a cost that differs between groups."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rewardlab.report import Group

Y_RANGE = (0.4, 1.0)  # accuracy axis: the same for every report (0-1 when a run falls outside it)
COST_SPREAD = {"wall_s": 1.25, "trainable": 1.01}  # drawn when the largest group mean / smallest exceeds this


def _number(value: str) -> float | None:
    try:
        x = float(value)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def short(value: str) -> str:
    """A label: numbers in their shortest form (1e-04 → 0.0001, 3.0 → 3), other values as they are."""
    x = _number(value)
    return f"{x:g}" if x is not None else value


def axis(groups: list[Group]) -> tuple[str, list[float], list[str], bool]:
    """Title, x positions, tick labels, log scale: a single numeric key is a numeric axis (log when it
    spans 10× or more); anything else is one category per group."""
    keys = list(groups[0].overrides)
    values = [g.overrides[k] for g in groups for k in keys]
    numbers = [_number(v) for v in values]
    if len(keys) == 1 and all(x is not None and x > 0 for x in numbers) and len(set(numbers)) == len(numbers):
        log = max(numbers) / min(numbers) >= 10
        return keys[0], numbers, [short(v) for v in values], log
    if not keys:
        return "all jobs", [0], ["all jobs"], False
    labels = ["\n".join(short(v) if len(keys) == 1 else f"{k}={short(v)}" for k, v in g.overrides.items())
              for g in groups]  # fmt: skip
    return ", ".join(keys), list(range(len(groups))), labels, False


def plot(metric: str, groups: list[Group], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    shown = [g for g in groups if g.ok]
    if not shown:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.text(0.5, 0.5, "no finished jobs", ha="center", va="center")
        ax.axis("off")
        fig.savefig(out, format="png", dpi=120)
        plt.close(fig)
        return
    name, xs, labels, log = axis(shown)
    costs = [c for c, spread in COST_SPREAD.items() if _spread([g.stats[c][0] for g in shown]) > spread]
    fig, axes = plt.subplots(1, 1 + len(costs), figsize=(5.5 + 4 * len(costs), 4.2), squeeze=False)
    ax = axes[0][0]
    for x, g in zip(xs, shown):
        mean, low, high = g.stats["acc"]
        seeds = [j.value(metric) for j in g.ok]
        ax.scatter([x] * len(seeds), seeds, s=14, color="0.55", zorder=2)
        err = [[mean - low], [high - mean]] if math.isfinite(low) else None
        ax.errorbar([x], [mean], yerr=err, fmt="o", color="C0", capsize=5, markersize=7, zorder=3)
    ax.axhline(0.5, color="C3", linestyle="--", linewidth=1, label="chance")
    values = [j.value(metric) for g in shown for j in g.ok]
    inside = all(Y_RANGE[0] <= v <= Y_RANGE[1] for v in values)
    ax.set_ylim(*(Y_RANGE if inside else (min(0.0, *values), max(1.0, *values))))  # never fitted to the noise
    ax.set_ylabel(f"{metric} (mean, 95% CI; grey: seeds)")
    for a in axes[0]:
        a.set_xlabel(name)
        if log:
            a.set_xscale("log")
            a.xaxis.set_minor_formatter(NullFormatter())  # only the swept values are labelled
        a.set_xticks(xs, labels, rotation=20 if max(map(len, labels)) > 8 and "\n" not in labels[0] else 0)
        a.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    for a, cost in zip(axes[0][1:], costs):
        means = [g.stats[cost][0] for g in shown]
        a.plot(xs, means, "s", color="C2")
        a.set_ylabel({"wall_s": "wall time per job (s)", "trainable": "trainable parameters"}[cost])
        a.set_yscale("log" if cost == "trainable" else "linear")
        if cost == "wall_s":
            a.set_ylim(0, max(means) * 1.15)
    seeds = sorted({len(g.ok) for g in shown})
    fig.suptitle(f"{metric} by {name} ({'/'.join(map(str, seeds))} seeds per setting)")
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=120)
    plt.close(fig)


def _spread(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v) and v > 0]
    return max(finite) / min(finite) if len(finite) > 1 else 1.0


def log_to_wandb(sweep_dir: Path, summary: dict[str, Any], header: list[str], rows: list[list[str]]) -> None:
    """The group table as a wandb Table and the plot as an image, in a `report` run of the sweep's group;
    offline (files under the sweep folder) unless logged in, as the training runs."""
    import wandb

    from rewardlab.loggers import has_wandb_credentials

    mode = os.environ.get("WANDB_MODE") or ("online" if has_wandb_credentials() else "offline")
    run = wandb.init(project="rewardlab", group=sweep_dir.name, job_type="report", name=f"report {sweep_dir.name}",
                     dir=str(sweep_dir), mode=mode, config={"metric": summary["metric"]})  # fmt: skip
    try:
        run.log({"report/groups": wandb.Table(columns=header, data=rows),
                 "report/plot": wandb.Image(str(sweep_dir / "report.png"))})  # fmt: skip
        best = [g for g in summary["groups"] if g["best"]]
        if best:
            run.summary["best/mean"] = best[0]["mean"]
            run.summary["best/overrides"] = best[0]["overrides"]
    finally:
        run.finish()
