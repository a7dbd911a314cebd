"""rewardlab benchmarks on realistic data, each figure measured side by side in one run and appended,
with the command that produced it, to docs/BENCHMARKS.md.

    python bench/run.py compare [--steps 64]    rewardlab (defaults) vs TRL's RewardTrainer (make bench)
    python bench/run.py levers                  each speed lever taken out of the defaults
    python bench/run.py shared                  SmolLM2 on long prompts: the shared-prompt pass vs two passes
    python bench/run.py cache                   frozen-trunk feature cache: epoch 1 vs later epochs
    python bench/run.py memory                  peak RSS at 1x and 10x the data
    python bench/run.py head-cost               head_only on the feature cache: k ensemble heads vs one
    python bench/run.py accuracy [--seeds 5] [--train-pairs 1024] [--variant "name: overrides"]
                                                held-out accuracy over seeds on the development pairs
    python bench/run.py heads [--data chitchat|quiz] [--backbone minilm|tiny] [--train-pairs 1024]
                                                head=linear/odin/ensemble × 3 seeds where length is a
                                                confound (experiment=length_heads), with the report
    python bench/run.py ratings                 pairs+BT vs Plackett–Luce vs regression × 3 seeds on ratings
                                                of the development conversations (experiment=ratings_compare)

Workloads (bench/workloads.py): `chitchat-pairs`, the project's real human preference pairs
(`../shared/data/chitchat-pairs`, when present); `hh` and `uf`, real English conversations shaped
like HH-RLHF (long multi-turn prompts, short responses) and UltraFeedback (short prompts, long
responses); and the embedded quiz. MiniLM, full fine-tune, max_length 256, 8 pairs per batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from jobs import CACHE, MAX_LENGTH, PAIRS_PER_BATCH, ROOT, matmul_peak, run_job  # noqa: E402
from workloads import BUILDERS, workload  # noqa: E402

REPORT = ROOT / "docs" / "BENCHMARKS.md"
DEV = next(  # the project's development pairs, or the copy the slow accuracy test uses
    (d for d in (ROOT.parent / "shared" / "data" / "chitchat-pairs", ROOT / "tests" / "fixtures" / "chitchat-pairs")
     if (d / "val.jsonl").exists()),
    ROOT / "tests" / "fixtures" / "chitchat-pairs",
)  # fmt: skip
LR = 2e-5


def data(name: str) -> Path:
    """A workload's folder with train/val/test .jsonl."""
    if name == "chitchat-pairs":
        folder = CACHE / name
        if not (folder / "test.jsonl").exists():
            if not DEV.exists():
                raise FileNotFoundError(f"{DEV}: the development pairs are not on this machine")
            folder.mkdir(parents=True, exist_ok=True)
            val = (DEV / "val.jsonl").read_text().splitlines(keepends=True)
            (folder / "train.jsonl").write_text((DEV / "train.jsonl").read_text())
            (folder / "val.jsonl").write_text("".join(val[: len(val) // 2]))
            (folder / "test.jsonl").write_text("".join(val[len(val) // 2 :]))
        return folder
    if name == "quiz":
        return ROOT / "rewardlab" / "assets" / "quiz"
    return workload(name, CACHE)


def machine() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores"


def table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def append(title: str, command: str, body: str) -> None:
    REPORT.parent.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = f"\n## {title} ({stamp})\n\nMachine: {machine()}. Reproduce: `{command}`\n\n{body}\n"
    with open(REPORT, "a") as f:
        f.write(text)
    print(text)


def compare(args: argparse.Namespace) -> None:
    """rewardlab with its defaults against TRL's fastest configuration (bf16, no checkpointing) and
    TRL's defaults, on each workload: same pairs, backbone, max_length, pairs per batch, lr, steps."""
    peak = matmul_peak()
    names = args.workloads.split(",")
    for name in names:
        folder = data(name)
        common = dict(data=str(folder), lr=LR, steps=args.steps)
        print(f"{name}: {args.steps} steps of {PAIRS_PER_BATCH} pairs", flush=True)
        rows = {
            "rewardlab, defaults": run_job("rewardlab", **common),
            "TRL, bf16, no checkpointing (its fastest)": run_job(
                "trl", gradient_checkpointing=False, bf16=True, **common
            ),
            "TRL, defaults (fp32, checkpointing)": run_job("trl", gradient_checkpointing=True, bf16=False, **common),
        }
        ours, fastest = rows["rewardlab, defaults"], rows["TRL, bf16, no checkpointing (its fastest)"]
        body = table(
            ["run", "pairs/s", "vs TRL fastest", "real tokens/s", "padding eff.", "MFU (real tokens)", "peak RSS MB",
             "test acc"],
            [
                [k, r["pairs_per_s"], r["pairs_per_s"] / fastest["pairs_per_s"], r["tokens_per_s"],
                 r["padding_efficiency"], r["flops_per_s"] / (peak["bf16"] * 1e9), r["peak_rss_mb"], r["test_acc"]]
                for k, r in rows.items()
            ],
        )  # fmt: skip
        body += (
            f"\n\n{name} ({folder.name}), MiniLM full fine-tune, {args.steps} steps × {PAIRS_PER_BATCH} pairs, "
            f"max_length {MAX_LENGTH}, lr {LR}; every other setting each trainer's default. rewardlab chose "
            f"precision {ours['precision']} and {ours['attention']} attention. MFU: model FLOPs of the real "
            f"tokens (6 × non-embedding parameters per token + attention) per second, over this CPU's measured "
            f"bf16 matmul peak ({peak['bf16']:.0f} GFLOP/s; fp32 {peak['fp32']:.0f}). Scoring the test split "
            f"(rewardlab's test step): {ours['eval_pairs_per_s']:.1f} pairs/s, "
            f"{ours['eval_pairs_per_s'] / ours['pairs_per_s']:.1f}× its training throughput. One run per row: "
            "accuracy after this few steps moves by points with the seed (see the accuracy section). TRL drops "
            f"pairs longer than max_length (it kept {fastest['pairs_kept']} pairs; rewardlab truncates and keeps "
            "all): where it drops some, its pairs are shorter, so compare real tokens/s, not pairs/s."
        )
        append(f"rewardlab vs TRL's RewardTrainer, {name}", f"python bench/run.py compare --workloads {name}", body)


LEVERS = {  # the lever taken out of the defaults: what runs instead
    "fp32 (no bf16 autocast)": ["trainer.precision=32-true"],
    "SDPA attention": ["backbone.attn_implementation=sdpa"],
    "eager attention": ["backbone.attn_implementation=eager"],
    "one padded pass per batch (no length chunks)": ["data.max_chunks=1"],
    "random batches (no length grouping)": ["data.group_by_length=false"],
    "gradient checkpointing on every batch": ["model.gradient_checkpointing=true"],
    "dropout on": ["model.disable_dropout=false"],
    "AdamW foreach (not fused)": ["optimizer.fused=false"],
}


def levers(args: argparse.Namespace) -> None:
    """The defaults, then each lever taken out (or the other choice forced): what each is worth here."""
    folder = data(args.workloads.split(",")[0])
    common = dict(data=str(folder), lr=LR, steps=args.steps)
    base = run_job("rewardlab", label="defaults", **common)
    rows = [["defaults", base["pairs_per_s"], 1.0, base["padding_efficiency"], base["peak_rss_mb"]]]
    for name, overrides in LEVERS.items():
        r = run_job("rewardlab", overrides=overrides, label=name, **common)
        rows.append([name, r["pairs_per_s"], base["pairs_per_s"] / r["pairs_per_s"], r["padding_efficiency"],
                     r["peak_rss_mb"]])  # fmt: skip
    body = table(["setting", "pairs/s", "defaults ÷ this", "padding eff.", "peak RSS MB"], rows)
    body += (
        f"\n\n{folder.name}, MiniLM, {args.steps} steps × {PAIRS_PER_BATCH} pairs, max_length {MAX_LENGTH}. The "
        f"defaults chose precision {base['precision']} and {base['attention']} attention (measured on this machine)."
    )
    append(
        "Speed levers, each taken out of the defaults", f"python bench/run.py levers --workloads {folder.name}", body
    )


def shared(args: argparse.Namespace) -> None:
    """A decoder (SmolLM2-135M) on long multi-turn prompts with short responses (`hh`): chosen and
    rejected sharing one pass over their prompt, against two passes; same pairs, steps and settings."""
    folder = data(args.workloads.split(",")[0])
    common = dict(data=str(folder), lr=LR, steps=args.steps, backbone="smollm2_135m")
    rows = []
    runs = {"shared prompt (default)": [], "two passes (model.share_prompt=false)": ["model.share_prompt=false"]}
    results = {name: run_job("rewardlab", overrides=o, label=name, **common) for name, o in runs.items()}
    base = results["two passes (model.share_prompt=false)"]
    for name, r in results.items():
        rows.append([name, r["pairs_per_s"], r["pairs_per_s"] / base["pairs_per_s"], r["peak_rss_mb"], r["test_acc"]])
    body = table(["run", "pairs/s", "speed-up", "peak RSS MB", "test acc"], rows)
    body += (
        f"\n\n{folder.name}, SmolLM2-135M-Instruct full fine-tune, {args.steps} steps × {PAIRS_PER_BATCH} pairs, "
        f"max_length {MAX_LENGTH}, lr {LR}, chat template; every other setting the default."
    )
    append("Shared prompt on a decoder", f"python bench/run.py shared --workloads {folder.name} --steps {args.steps}",
           body)  # fmt: skip


def cache(args: argparse.Namespace) -> None:
    """head_only and last_n on MiniLM, three epochs: the first computes the frozen trunk, the others reuse it."""
    folder = data(args.workloads.split(",")[0])
    common = dict(data=str(folder), lr=1e-3, steps=-1)
    rows = []
    for freeze in ("head_only", "last_n"):
        results = {}
        for on in (True, False):
            overrides = [f"freeze={freeze}", f"freeze.cache_features={str(on).lower()}", "trainer.max_epochs=3"]
            label = f"{freeze} cache={on}"
            results[on] = run_job("rewardlab", overrides=overrides, label=label, cache_dir=tempfile.mkdtemp(), **common)
        e = results[True]["epoch_seconds"]
        later = sum(e[1:]) / len(e[1:])
        rows.append([freeze, e[0], later, e[0] / later, results[False]["epoch_seconds"][1], results[True]["test_acc"],
                     results[False]["test_acc"]])  # fmt: skip
    body = table(["freeze", "epoch 1 s (computes)", "epochs 2-3 s (cached)", "speed-up", "epoch 2 s without cache",
                  "test acc with cache", "test acc without"], rows)  # fmt: skip
    body += f"\n\n{folder.name}, MiniLM, 3 epochs; `last_n` trains the top block from the cached input of block 6."
    append("Frozen-trunk feature cache", f"python bench/run.py cache --workloads {folder.name}", body)


def memory(args: argparse.Namespace) -> None:
    """Peak RSS of the same run on 1x and 10x the data: tokenized data stays on disk."""
    folder = data(args.workloads.split(",")[0])
    tenfold = CACHE / f"{folder.name}-x10"
    if not (tenfold / "test.jsonl").exists():
        tenfold.mkdir(parents=True, exist_ok=True)
        (tenfold / "train.jsonl").write_text((folder / "train.jsonl").read_text() * 10)
        for split in ("val", "test"):
            (tenfold / f"{split}.jsonl").write_text((folder / f"{split}.jsonl").read_text())
    rows = []
    for label, f in (("1x", folder), ("10x", tenfold)):
        r = run_job("rewardlab", data=str(f), lr=LR, steps=args.steps, label=label)
        rows.append([label, r["peak_rss_mb"], r["pairs_per_s"]])
    body = table(["train data", "peak RSS MB", "pairs/s"], rows)
    body += f"\n\nRSS ratio 10x / 1x: {rows[1][1] / rows[0][1]:.3f} (the 10x run first tokenizes all of it)."
    append("Peak memory against dataset size", f"python bench/run.py memory --workloads {folder.name}", body)


def head_cost(args: argparse.Namespace) -> None:
    """freeze=head_only on MiniLM, three epochs, feature cache on: one linear head against ensembles of 4 and
    16 heads. Epoch 1 computes the frozen trunk; later epochs run only the heads on the cached features."""
    folder = data(args.workloads.split(",")[0])
    common = dict(data=str(folder), lr=1e-3, steps=-1)
    rows, base = [], None
    for head in ("linear", "ensemble k=4", "ensemble k=16"):
        name, _, k = head.partition(" ")
        overrides = ["freeze=head_only", f"head={name}", "trainer.max_epochs=3", *([f"head.{k}"] if k else [])]
        found = run_job("rewardlab", overrides=overrides, label=head, cache_dir=tempfile.mkdtemp(), **common)
        e = found["epoch_seconds"]
        later = sum(e[1:]) / len(e[1:])
        base = base or later
        rows.append([head, e[0], later, later / base, found["test_acc"]])
    body = table(["head", "epoch 1 s (computes the trunk)", "epochs 2-3 s (cached)", "× linear", "test acc"], rows)
    body += f"\n\n{folder.name}, MiniLM, freeze=head_only, 3 epochs, each run with its own empty feature cache."
    append("Ensemble heads on a frozen trunk", f"python bench/run.py head-cost --workloads {folder.name}", body)


def development(train_pairs: int) -> Path:
    """The development pairs for accuracy: the first `train_pairs` training pairs (0: all), and the whole
    val split as both val and test (one validation at the end of the one epoch, so nothing is selected on it)."""
    if not DEV.exists():
        raise FileNotFoundError(f"{DEV}: the development pairs are not on this machine")
    train = (DEV / "train.jsonl").read_text().splitlines(keepends=True)
    train = train[:train_pairs] if train_pairs else train
    folder = CACHE / f"chitchat-dev-{len(train)}"
    if not (folder / "test.jsonl").exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.jsonl").write_text("".join(train))
        for split in ("val", "test"):
            (folder / f"{split}.jsonl").write_text((DEV / "val.jsonl").read_text())
    return folder


def longer_baseline(folder: Path) -> float:
    """Accuracy of always preferring the longer response (in characters; a tie counts half)."""
    rows = [json.loads(line) for line in open(folder / "test.jsonl")]
    wins = [(len(r["chosen"]) > len(r["rejected"])) + 0.5 * (len(r["chosen"]) == len(r["rejected"])) for r in rows]
    return sum(wins) / len(wins)


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and its 95% confidence interval (Student's t over the seeds)."""
    from scipy import stats

    mean = statistics.mean(values)
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def accuracy(args: argparse.Namespace) -> None:
    """Held-out accuracy over seeds on the development pairs (whole val split): rewardlab's defaults and
    each `--variant`, TRL's fastest configuration, and "pick the longer response"; one epoch over the
    training pairs; each variant against TRL seed by seed (paired), with 95% CIs."""
    folder = development(args.train_pairs)
    pairs = sum(1 for _ in open(folder / "train.jsonl"))
    steps = -(-pairs // PAIRS_PER_BATCH)
    variants = {"rewardlab, defaults": list(args.overrides)}
    for spec in args.variant:
        name, _, overrides = spec.partition(":")
        variants[name.strip()] = [*args.overrides, *overrides.split()]
    runs: dict[str, list[float]] = {name: [] for name in variants}
    trl = "TRL, bf16, no checkpointing"
    if not args.no_trl:
        runs[trl] = []
    for seed in range(1, args.seeds + 1):
        common = dict(data=str(folder), lr=LR, steps=steps, seed=seed)
        for name, overrides in variants.items():
            runs[name].append(
                run_job("rewardlab", overrides=overrides, label=f"{name}, seed {seed}", **common)["test_acc"]
            )
        if not args.no_trl:
            runs[trl].append(run_job("trl", gradient_checkpointing=False, bf16=True, label=f"seed {seed}", **common)[
                "test_acc"])  # fmt: skip
    base = runs[trl] if not args.no_trl else runs["rewardlab, defaults"]
    rows = []
    for name, accs in runs.items():
        mean, low, high = interval(accs)
        diff = [a - b for a, b in zip(accs, base)]
        d = interval(diff) if accs is not base else (0.0, 0.0, 0.0)
        rows.append(
            [name, *accs, mean, f"{low:.3f}..{high:.3f}", f"{d[0] * 100:+.1f} ({d[1] * 100:+.1f}..{d[2] * 100:+.1f})"]
        )
    longer = longer_baseline(folder)
    rows.append(["pick the longer response", *[""] * args.seeds, longer, "", ""])
    against = trl if not args.no_trl else "rewardlab, defaults"
    body = table(
        ["run", *[f"seed {i}" for i in range(1, args.seeds + 1)], "mean", "95% CI", f"− {against}, points (95% CI)"],
        rows,
    )
    body += (
        f"\n\nDevelopment pairs: the first {pairs} training pairs, one epoch ({steps} steps × {PAIRS_PER_BATCH} "
        f"pairs), MiniLM full fine-tune, max_length {MAX_LENGTH}, lr {LR}; accuracy on the whole val split "
        f"({sum(1 for _ in open(folder / 'test.jsonl'))} pairs). Differences are paired by seed. Variants: "
        + "; ".join(f"{k}: `{' '.join(v) or '(none)'}`" for k, v in variants.items())
    )
    command = f"python bench/run.py accuracy --train-pairs {args.train_pairs} --seeds {args.seeds}"
    command += "".join(f' --variant "{v}"' for v in args.variant) + (" --no-trl" if args.no_trl else "")
    command += f" --overrides {' '.join(args.overrides)}" if args.overrides else ""
    append(f"Held-out accuracy over seeds, {pairs} training pairs", command, body)


def length_confounded(train_pairs: int, longer_share: float) -> Path:
    """The development pairs re-split so that length is a confound: training and validation pairs (from
    the training file) whose chosen response is the longer (in characters) in `longer_share` of them; a
    test split (from the val file) where it is the longer in exactly half. Pairs of equal length are left
    out; each kind is taken in file order. Length is compared in characters here; the metrics count tokens, so
    a few pairs of near-equal length may fall on the other side there."""
    if not DEV.exists():
        raise FileNotFoundError(f"{DEV}: the development pairs are not on this machine")

    def by_length(name: str) -> tuple[list[str], list[str]]:
        lines = (DEV / name).read_text().splitlines(keepends=True)
        rows = [json.loads(line) for line in lines]
        longer = [x for x, r in zip(lines, rows) if len(r["chosen"]) > len(r["rejected"])]
        return longer, [x for x, r in zip(lines, rows) if len(r["chosen"]) < len(r["rejected"])]

    longer, shorter = by_length("train.jsonl")
    n_longer = round(train_pairs * longer_share)
    n_val = min(256, len(longer) - n_longer)
    v_longer = round(n_val * longer_share)
    train = longer[:n_longer] + shorter[: train_pairs - n_longer]
    val = longer[n_longer : n_longer + v_longer] + shorter[train_pairs - n_longer :][: n_val - v_longer]
    test_longer, test_shorter = by_length("val.jsonl")
    half = min(len(test_longer), len(test_shorter))
    folder = CACHE / f"length-confound-{train_pairs}-{longer_share}"
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in (("train", train), ("val", val), ("test", test_longer[:half] + test_shorter[:half])):
        (folder / f"{split}.jsonl").write_text("".join(lines))
    return folder


FILLER = "and I say so with full confidence after thinking it through very carefully indeed".split()


def length_confounded_quiz(longer_share: float) -> Path:
    """The quiz with length made a confound: filler words (2 to 12, which say nothing about the answer)
    end the chosen response in `longer_share` of the training and validation pairs and the rejected one in
    the others; in the test pairs each side gets them in exactly half."""
    import random

    folder = CACHE / f"length-confound-quiz-{longer_share}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for split in ("train", "val", "test"):
        rows = [json.loads(line) for line in open(ROOT / "rewardlab" / "assets" / "quiz" / f"{split}.jsonl")]
        out = []
        for i, row in enumerate(rows):
            chosen_longer = i % 2 == 0 if split == "test" else rng.random() < longer_share
            side = "chosen" if chosen_longer else "rejected"
            row[side] = row[side].removesuffix(".") + ", " + " ".join(FILLER[: rng.randint(2, 12)]) + "."
            out.append(json.dumps(row) + "\n")
        (folder / f"{split}.jsonl").write_text("".join(out))
    return folder


def heads(args: argparse.Namespace) -> None:
    """experiment=length_heads on length-confounded data (the development pairs, or the quiz with filler
    words), then the sweep report."""
    import subprocess

    tiny = args.backbone == "tiny"
    setup = ["backbone=tiny", "trainer.max_epochs=12"] if tiny else []  # from scratch: its default epochs
    training = (
        "the tiny backbone from scratch with its recipe, 12 epochs"
        if tiny
        else "MiniLM full fine-tune with its recipe, one epoch"
    )
    if args.data == "quiz":  # MiniLM: the first 2,000 training pairs (125 batches) keep 9 jobs near 20 minutes
        folder, setup = length_confounded_quiz(0.9), [*setup, "data.batch_size=16"]
        setup += [] if tiny else ["trainer.limit_train_batches=125"]
        what = (
            "the quiz (objective right answers), where 2–12 filler words end the chosen response in 90% of the "
            "training and validation pairs and the rejected one in the others, and each side in half of the test "
            f"pairs (`length_confounded_quiz` in bench/run.py). {training.capitalize()}, 16 pairs per batch"
            + ("" if tiny else " (125 batches: the first 2,000 of its training pairs in the epoch's order)")
        )
    else:
        folder, what = length_confounded(args.train_pairs, 0.9), ""
    sweep = CACHE / f"length-heads-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    data = [f"data.{s}_file={folder}/{s}.jsonl" for s in ("train", "val", "test")]
    overrides = ["experiment=length_heads", *setup, *data, "logger=csv", f"hydra.sweep.dir={sweep}", *args.overrides]
    subprocess.run([sys.executable, "-m", "rewardlab.train", *overrides], check=True, cwd=ROOT)
    report = subprocess.run([sys.executable, "-m", "rewardlab.report", str(sweep)], check=True, cwd=ROOT,
                            capture_output=True, text=True).stdout  # fmt: skip
    counts = {s: sum(1 for _ in open(folder / f"{s}.jsonl")) for s in ("train", "val", "test")}
    what = what or (
        f"the development pairs re-split so that the chosen response is the longer in 90% of the "
        f"{counts['train']} training and {counts['val']} validation pairs and in half of the {counts['test']} "
        f"test pairs (`length_confounded` in bench/run.py). {training.capitalize()}, 8 pairs per batch"
    )
    body = (
        f"Data: {what}. Length-controlled accuracy: the mean of the accuracies where the chosen response is the "
        f"longer and where it is the shorter. Sweep folder: {sweep.relative_to(ROOT)}\n\n"
        + report.split("\nwrote ", 1)[0]
    )
    command = f"python bench/run.py heads --data {args.data} --backbone {args.backbone}"
    command += f" --train-pairs {args.train_pairs}" if args.data == "chitchat" else ""
    command += f" --overrides {' '.join(args.overrides)}" if args.overrides else ""
    append(f"Reward heads where length is a confound ({args.data}, {args.backbone})", command, body)


def ratings_longer_baseline(path: Path) -> float:
    """Accuracy of preferring the longer response (characters; equal lengths count half) on the test pairs
    the ratings make: every two responses of a prompt with different summed ratings."""
    by_prompt: dict[str, list[tuple[float, int]]] = {}
    for line in open(path):
        row = json.loads(line)
        by_prompt.setdefault(row["prompt"], []).append((sum(row["scores"].values()), len(row["response"])))
    wins = [
        (la > lb) + 0.5 * (la == lb) if sa > sb else (lb > la) + 0.5 * (la == lb)
        for group in by_prompt.values()
        for i, (sa, la) in enumerate(group)
        for sb, lb in group[i + 1 :]
        if sa != sb
    ]
    return sum(wins) / len(wins)


def ratings(args: argparse.Namespace) -> None:
    """experiment=ratings_compare on the development conversations' own ratings, then the sweep report."""
    import subprocess

    from workloads import chitchat_ratings

    folder = CACHE / "chitchat-ratings"
    rows = chitchat_ratings(DEV, folder)
    sweep = CACHE / f"ratings-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    data = [f"data.{s}_file={folder}/{s}.jsonl" for s in ("train", "val", "test")]
    attributes = ["data.attributes=[witty,upbeat,interesting]", "data.attribute_weights=[1.0,1.0,1.0]"]
    overrides = ["experiment=ratings_compare", *data, *attributes, "logger=csv", f"hydra.sweep.dir={sweep}"]
    subprocess.run([sys.executable, "-m", "rewardlab.train", *overrides, *args.overrides], check=True, cwd=ROOT)
    report = subprocess.run([sys.executable, "-m", "rewardlab.report", str(sweep)], check=True, cwd=ROOT,
                            capture_output=True, text=True).stdout  # fmt: skip
    body = (
        f"Data: the development conversations' own ratings (witty, upbeat, interesting; 1–10), {rows['train']} "
        f"training, {rows['val']} validation and {rows['test']} test conversations (`chitchat_ratings` in "
        "bench/workloads.py); combined score = their sum. Tested on every two conversations of a test prompt with "
        "different combined scores. MiniLM full fine-tune, 2 epochs, 8 pairs (or groups of up to 16 responses) per "
        f"step. Sweep folder: {sweep.relative_to(ROOT)}\n\n" + report.split("\nwrote ", 1)[0]
    )
    longer = ratings_longer_baseline(folder / "test.jsonl")
    body += f'\n\n"Pick the longer conversation" on these test pairs: {longer:.3f}.'
    command = "python bench/run.py ratings" + (f" --overrides {' '.join(args.overrides)}" if args.overrides else "")
    append("Learning from ratings: pairs + Bradley–Terry vs Plackett–Luce vs regression", command, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "what", choices=["compare", "levers", "shared", "cache", "memory", "accuracy", "heads", "head-cost", "ratings"]
    )
    parser.add_argument("--steps", type=int, default=64, help="training steps per run (accuracy: one epoch, always)")
    parser.add_argument("--workloads", default=None, help="comma-separated (default: each command's own)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--overrides", nargs="*", default=[], help="accuracy: rewardlab overrides for every run")
    parser.add_argument("--variant", action="append", default=[], help='accuracy: "name: override override ..."')
    parser.add_argument("--train-pairs", type=int, default=1024, help="accuracy: the first N training pairs (0: all)")
    parser.add_argument("--no-trl", action="store_true", help="accuracy: rewardlab's runs only")
    parser.add_argument("--data", choices=["chitchat", "quiz"], default="chitchat", help="heads: the confounded data")
    parser.add_argument("--backbone", choices=["minilm", "tiny"], default="minilm", help="heads: the backbone")
    args = parser.parse_args()
    if args.what == "accuracy" and (args.seeds < 2 or args.train_pairs < 0):
        parser.error("accuracy: --seeds must be at least 2 (a confidence interval needs two) and --train-pairs >= 0")
    if args.what == "heads" and args.train_pairs < 1:
        parser.error("heads: --train-pairs must be at least 1 (the confounded split takes that many training pairs)")
    if args.workloads is None:
        args.workloads = {"compare": ",".join(["chitchat-pairs", *sorted(BUILDERS.keys() - {"chitchat"}), "quiz"]),
                          "shared": "hh"}.get(args.what, "chitchat-pairs")  # fmt: skip
    commands = {"compare": compare, "levers": levers, "shared": shared, "cache": cache, "memory": memory,
                "head-cost": head_cost}  # fmt: skip
    (commands | {"accuracy": accuracy, "heads": heads, "ratings": ratings})[args.what](args)


if __name__ == "__main__":
    main()
