"""Benchmark workloads of real English text with the length distributions users train on.

The text is the Chit Chat Challenge dataset (BYU-PCCL, MIT licence: 7,168 human-human conversations
with their opening prompt and ratings), installed from PyPI as `chitchat-dataset`; only lengths and
tokenization matter for speed, so the pairs are built to match three shapes:

- `chitchat`: as the project's development data (`../shared/data/chitchat-pairs`): two conversations
  answering the same opening prompt, up to 600 characters, the better rated one chosen;
- `hh`: HH-RLHF-like: a multi-turn prompt of a few hundred tokens, two short single-turn responses;
- `uf`: UltraFeedback-like: a short prompt, two long responses (up to ~250 tokens).

Each is written once as train/val/test .jsonl under `.cache/bench/<name>/`, deterministically.
"""

from __future__ import annotations

import importlib.util
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

SPLITS = {"train": 1024, "val": 256, "test": 256}


def conversations() -> list[dict[str, Any]]:
    """(prompt, turns, mean rating) of every conversation in the chitchat-dataset package."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the benchmark's text comes from `pip install chitchat-dataset==0.9.0`")
    raw = json.loads((Path(spec.submodule_search_locations[0]) / "dataset.json").read_text())
    out = []
    for key in sorted(raw):
        c = raw[key]
        turns = [" ".join(u["text"] for u in m) for m in c["messages"]]
        ratings = [r for r in (c.get("ratings") or {}).values() if isinstance(r, (int, float))]
        if turns and ratings:
            out.append({"prompt": c["prompt"], "turns": turns, "rating": sum(ratings) / len(ratings)})
    return out


def transcript(turns: list[str]) -> str:
    return "\n".join(f"Speaker {1 + i % 2}: {t}" for i, t in enumerate(turns))


def chitchat_pairs(convs: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in convs:
        text = transcript(c["turns"])
        if len(text) <= 600:
            by_prompt[c["prompt"]].append({**c, "text": text})
    pairs = []
    for prompt, group in sorted(by_prompt.items()):
        rng.shuffle(group)
        for a, b in zip(group[::2], group[1::2]):
            if a["rating"] != b["rating"]:
                hi, lo = (a, b) if a["rating"] > b["rating"] else (b, a)
                pairs.append({"prompt": prompt, "chosen": hi["text"], "rejected": lo["text"]})
    return pairs


def hh_pairs(convs: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    long = [c for c in convs if len(c["turns"]) >= 8]
    short_turns = [t for c in convs for t in c["turns"] if 20 <= len(t) <= 200]
    pairs = []
    for c in long:
        k = rng.randint(6, min(len(c["turns"]) - 1, 16))
        prompt = transcript(c["turns"][:k])[-2000:]
        chosen = c["turns"][k][:300]
        if len(prompt) >= 600 and chosen.strip():
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rng.choice(short_turns)})
    return pairs


def uf_pairs(convs: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    bodies = [transcript(c["turns"])[:1100] for c in convs if len(transcript(c["turns"])) >= 600]
    pairs = []
    for c in convs:
        a, b = rng.sample(bodies, 2)
        pairs.append({"prompt": c["prompt"], "chosen": a, "rejected": b})
    return pairs


BUILDERS = {"chitchat": chitchat_pairs, "hh": hh_pairs, "uf": uf_pairs}


def workload(name: str, cache: Path) -> Path:
    """The folder of a workload's train/val/test .jsonl, built once."""
    folder = cache / name
    if (folder / "test.jsonl").exists():
        return folder
    rng = random.Random(1234)
    pairs = BUILDERS[name](conversations(), rng)
    rng.shuffle(pairs)
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for split, n in SPLITS.items():
        rows = pairs[start : start + n]
        start += n
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def chitchat_ratings(dev: Path, out: Path, val_prompts: float = 0.2) -> dict[str, int]:
    """Ratings rows `{prompt, response, scores: {witty, upbeat, interesting}}` of the development conversations:
    those whose transcript is a side of a development pair (`dev`/train.jsonl, val.jsonl), with each one's own
    three ratings from the package. The held-out conversations are never read. The conversations of
    train.jsonl make train and val (a fifth of their prompts, chosen by a fixed shuffle); those of val.jsonl
    make test. Returns the rows per split."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the ratings come from `pip install chitchat-dataset==0.9.0`")
    raw = json.loads((Path(spec.submodule_search_locations[0]) / "dataset.json").read_text())
    sides: dict[tuple[str, str], str] = {}
    for split in ("train", "val"):
        for line in open(dev / f"{split}.jsonl"):
            row = json.loads(line)
            for side in ("chosen", "rejected"):
                sides.setdefault((row["prompt"], row[side]), split)
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    seen = set()
    for key in sorted(raw):
        c = raw[key]
        text = transcript([" ".join(u["text"] for u in m) for m in c["messages"]])
        ratings = c.get("ratings") or {}
        where = sides.get((c.get("prompt"), text))
        if where and set(ratings) == {"witty", "upbeat", "interesting"} and (c["prompt"], text) not in seen:
            seen.add((c["prompt"], text))
            scores = {name: ratings[name] for name in ("witty", "upbeat", "interesting")}
            rows[where].append({"prompt": c["prompt"], "response": text, "scores": scores})
    prompts = sorted({r["prompt"] for r in rows["train"]})
    random.Random(0).shuffle(prompts)
    held = set(prompts[: round(len(prompts) * val_prompts)])
    splits = {
        "train": [r for r in rows["train"] if r["prompt"] not in held],
        "val": [r for r in rows["train"] if r["prompt"] in held],
        "test": rows["val"],
    }
    out.mkdir(parents=True, exist_ok=True)
    for split, items in splits.items():
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    return {split: len(items) for split, items in splits.items()}
