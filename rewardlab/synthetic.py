"""The embedded preference dataset: questions with one objectively right answer.

No public preference dataset can be downloaded offline, and learning must be measurable, so the
default data is generated: each pair asks a simple question (compare two numbers, parity, the
next number, an opposite word); `chosen` answers it correctly, `rejected` wrongly, in the same
words. Chosen and rejected have the same length distribution, so a model that learned length
scores 0.5. `long_tail=True` adds shared filler context of long-tailed length, like real chat
data (many short pairs, a few near the context limit); the benchmark uses it.

    python -m rewardlab.synthetic OUT_DIR --train 6000 --val 500 --test 500 [--long-tail] [--tasks compare,parity]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "up": "down",
    "open": "closed",
    "light": "dark",
    "happy": "sad",
    "early": "late",
    "full": "empty",
    "hard": "soft",
    "high": "low",
    "long": "short",
    "wet": "dry",
    "old": "new",
    "rich": "poor",
    "loud": "quiet",
    "strong": "weak",
    "thick": "thin",
    "push": "pull",
    "win": "lose",
    "buy": "sell",
    "inside": "outside",
    "first": "last",
    "true": "false",
}
OPPOSITES.update({v: k for k, v in OPPOSITES.items()})

ANSWER_STYLES = ("{a}", "The answer is {a}.", "It is {a}.", "{a}, of course.", "Answer: {a}")

FILLER = (
    "I have been thinking about this for a while.",
    "My teacher asked us to check our work.",
    "We talked about it at lunch yesterday.",
    "This came up while I was cooking dinner.",
    "It is part of a quiz for my younger brother.",
    "The weather was rainy so we stayed inside.",
    "I want to be sure before I write it down.",
    "Please keep the answer short and clear.",
    "A friend gave me a different answer earlier.",
    "I am preparing notes for a small class.",
    "The library was closed, so I could not look it up.",
    "We are playing a game with questions.",
    "My notebook has a lot of these exercises.",
    "It should be easy, but I want to double check.",
    "The train was late again this morning.",
    "I like to start the day with a puzzle.",
)

Pair = dict[str, str]


def _compare(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(range(100), 2)
    if rng.random() < 0.5:
        q = rng.choice(
            ("Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?", "Pick the larger of {a} and {b}.")
        )
        right, wrong = max(a, b), min(a, b)
    else:
        q = rng.choice(
            ("Which is smaller, {a} or {b}?", "Which number is less: {a} or {b}?", "Pick the smaller of {a} and {b}.")
        )
        right, wrong = min(a, b), max(a, b)
    return q.format(a=a, b=b), str(right), str(wrong)


def _parity(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randrange(1000)
    q = rng.choice(("Is {n} even or odd?", "Is the number {n} odd or even?", "Even or odd: {n}?"))
    right, wrong = ("even", "odd") if n % 2 == 0 else ("odd", "even")
    return q.format(n=n), right, wrong


def _successor(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randrange(99)
    q = rng.choice(
        ("What number comes after {n}?", "What is the next number after {n}?", "Count on from {n}: what comes next?")
    )
    wrong = rng.choice([m for m in (n - 1, n, n + 2) if m >= 0])
    return q.format(n=n), str(n + 1), str(wrong)


def _opposite(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(sorted(OPPOSITES))
    q = rng.choice(("What is the opposite of {w}?", "Give the opposite of the word '{w}'.", "Name the antonym of {w}."))
    wrong = rng.choice(sorted(set(OPPOSITES) - {OPPOSITES[word]}))
    return q.format(w=word), OPPOSITES[word], wrong


TASKS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "compare": _compare,
    "parity": _parity,
    "successor": _successor,
    "opposite": _opposite,
}


def _filler(rng: random.Random, max_sentences: int) -> str:
    """Shared context of long-tailed length: most pairs get none or a little, a few a lot."""
    n = min(int(rng.paretovariate(1.2)) - 1, max_sentences) if rng.random() < 0.7 else 0
    return " ".join(rng.choice(FILLER) for _ in range(n))


def _key(row: Pair) -> tuple[str, str, str]:
    return row["prompt"], row["chosen"], row["rejected"]


def pairs(
    n: int,
    seed: int,
    long_tail: bool = False,
    seen: set | None = None,
    tasks: Sequence[str] = tuple(TASKS),
    max_filler: int = 60,
) -> Iterator[Pair]:
    """Yield `n` deterministic, distinct pairs. `seen` holds the (prompt, chosen, rejected) of pairs
    made before (other splits): those are skipped, and every pair yielded is added to it."""
    seen = set() if seen is None else seen
    rng = random.Random(seed)
    names = sorted(tasks)
    if unknown := set(names) - set(TASKS):
        raise ValueError(f"unknown tasks {sorted(unknown)}; expected some of {sorted(TASKS)}")
    made = 0
    while made < n:
        task = names[made % len(names)]
        question, right, wrong = TASKS[task](rng)
        prompt = f"{_filler(rng, max_filler)} {question}".strip() if long_tail else question
        style = rng.choice(ANSWER_STYLES)
        row = {"prompt": prompt, "chosen": style.format(a=right), "rejected": style.format(a=wrong), "subset": task}
        if _key(row) not in seen:
            seen.add(_key(row))
            made += 1
            yield row


def write_splits(
    out_dir: Path,
    sizes: dict[str, int],
    seed: int = 0,
    long_tail: bool = False,
    tasks: Sequence[str] = tuple(TASKS),
    max_filler: int = 60,
) -> None:
    """Write `{split}.jsonl` for each split; no split repeats a pair of an earlier split."""
    out_dir.mkdir(parents=True, exist_ok=True)
    seen: set[tuple[str, str, str]] = set()
    for i, (split, n) in enumerate(sizes.items()):
        rows = list(pairs(n, seed=seed + i, long_tail=long_tail, seen=seen, tasks=tasks, max_filler=max_filler))
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--train", type=int, default=6000)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--long-tail", action="store_true")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {','.join(TASKS)}")
    p.add_argument("--max-filler", type=int, default=60, help="most filler sentences before a long-tail question")
    a = p.parse_args()
    sizes = {"train": a.train, "val": a.val, "test": a.test}
    write_splits(a.out_dir, sizes, a.seed, a.long_tail, a.tasks.split(","), a.max_filler)


if __name__ == "__main__":
    main()
