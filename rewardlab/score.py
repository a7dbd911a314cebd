"""Score responses with an exported reward model:
`python -m rewardlab.score model_dir=DIR input=IN.jsonl output=OUT.jsonl` (also `rewardlab-score`).

Input rows are `{prompt, response}` or any pair schema of training (`{prompt, chosen, rejected}`,
conversational, implicit). Texts are formatted and truncated exactly as in training (the export
records how) and scored by plain transformers in length-sorted batches. Every output row keeps all
input fields and adds `reward` (per response), `reward_normalized` when the export has statistics,
and `text`: the exact string which, tokenized with `add_special_tokens=False`, gives the scored ids.
One output row per input row, in input order; a bad row is an error naming its line, or with
`on_bad_row=skip` an output row carrying `error` instead of a reward.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from rich.progress import Progress
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rewardlab.data import (
    BadRow,
    DataError,
    Formatter,
    Pair,
    check_row,
    detect_schema,
    pad_sequences,
    read_source,
    truncate,
)

log = logging.getLogger(__name__)


class Scorer:
    """An exported model folder: formats and tokenizes like training, scores in length-sorted batches."""

    def __init__(self, model_dir: str, trust_remote_code: bool, batch_size: int, dtype: str = "float32"):
        folder = Path(model_dir)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"model_dir={model_dir}: no config.json (expected a rewardlab.export folder)")
        config = json.loads(config_file.read_text())
        if "rewardlab" not in config:
            raise ValueError(f"model_dir={model_dir}: not written by rewardlab.export (no 'rewardlab' in config.json)")
        if "auto_map" in config and not trust_remote_code:
            raise ValueError(
                f"model_dir={model_dir} uses rewardlab's modeling file (its backbone family reads "
                "another token natively); pass trust_remote_code=true to load it"
            )
        self.info = config["rewardlab"]
        self.mean, self.std = config.get("reward_mean"), config.get("reward_std")
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            folder, trust_remote_code=trust_remote_code, dtype=getattr(torch, dtype)
        ).eval()
        self.formatter = Formatter(self.tokenizer, self.info["format"], self.info["chat_template"])
        self.max_length, self.batch_size = self.info["max_length"], batch_size

    def exact(self, ids: list[int]) -> tuple[str, list[int]]:
        """The text of truncated ids, re-tokenized so that text -> ids holds exactly (a cut can
        split a merge); still within max_length."""
        for _ in range(4):
            text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            again = self.formatter.encode([text])[0]
            if len(again) <= self.max_length:
                return text, again
            n = self.formatter.n_protected
            ids = again[:n] + again[n + len(again) - self.max_length :]
        raise DataError(f"cannot fit this text into max_length={self.max_length} tokens reproducibly")

    def encode(self, prompt: str | list[dict], response: str | list[dict]) -> tuple[str, list[int]]:
        """Format (prompt, response) as in training and truncate it the same way: prompt first."""
        head, full = self.formatter.texts(prompt, response)
        ids = self.formatter.encode([full])[0]
        if len(ids) <= self.max_length:
            return full, ids
        n_prompt = len(self.formatter.encode([head])[0])
        ids = truncate(ids, ids, n_prompt, self.formatter.n_protected, self.max_length)[0]
        return self.exact(ids)

    def encode_text(self, text: str) -> tuple[str, list[int]]:
        """An already formatted text (prompt and response), as PPO loops send it: padding removed,
        tokenized as is, the start cut (after BOS) when too long."""
        if self.tokenizer.pad_token:
            text = text.replace(self.tokenizer.pad_token, "")
        ids = self.formatter.encode([text])[0]
        if len(ids) <= self.max_length:
            return text, ids
        n = self.formatter.n_protected
        return self.exact(ids[:n] + ids[n + len(ids) - self.max_length :])

    @torch.inference_mode()
    def score(self, sequences: list[list[int]], progress: Progress | None = None) -> np.ndarray:
        """Rewards of token id sequences, computed in batches of similar length, in input order."""
        rewards = np.zeros(len(sequences))
        order = np.argsort([-len(s) for s in sequences], kind="stable")
        task = progress.add_task("scoring", total=len(sequences)) if progress else None
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            input_ids, mask = pad_sequences([sequences[i] for i in chunk], self.tokenizer.pad_token_id)
            logits = self.model(input_ids=input_ids.to(self.model.device), attention_mask=mask.to(self.model.device))
            rewards[chunk] = logits.logits[:, 0].float().cpu().numpy()
            if progress:
                progress.advance(task, len(chunk))
        return rewards

    def normalized(self, reward: float) -> float | None:
        return (reward - self.mean) / self.std if self.mean is not None and self.std else None


def _single(row: Any, where: str, columns: dict[str, str]) -> tuple[Any, Any] | BadRow:
    """A `{prompt, response}` row: prompt a string or messages (may be empty), response non-empty."""
    prompt, response = row.get(columns["prompt"], ""), row[columns["response"]]
    for key, value in (("prompt", prompt), ("response", response)):
        if not isinstance(value, (str, list)):
            return BadRow(where, columns[key], "not_a_string", f"expected a string or messages, got {value!r:.40}", row)
    if not (response.strip() if isinstance(response, str) else response):
        return BadRow(where, columns["response"], "empty_response", "empty response", row)
    return prompt, response


def score_file(cfg: DictConfig) -> dict[str, int]:
    """Score every row of `cfg.input` into `cfg.output`; return counts of rows, scored and errors."""
    scorer = Scorer(cfg.model_dir, cfg.trust_remote_code, cfg.batch_size, cfg.dtype)
    columns = dict(cfg.columns)
    rows: list[tuple[str, Any]] = list(read_source(cfg.input, "train"))
    jobs: list[tuple[int, str | None, str, list[int]]] = []  # (row, side or None, text, ids)
    errors: dict[int, str] = {}
    schema = None
    for i, (where, row) in enumerate(rows):
        try:
            if isinstance(row, dict) and columns["response"] in row:
                single = _single(row, where, columns)
                if isinstance(single, BadRow):
                    raise DataError(single.message())
                jobs.append((i, None, *scorer.encode(*single)))
                continue
            if schema is None and isinstance(row, dict):
                schema = detect_schema(row, columns) if cfg.schema == "auto" else cfg.schema
            pair = check_row(row, where, schema or "explicit", columns)
            if isinstance(pair, BadRow):
                raise DataError(pair.message())
            assert isinstance(pair, Pair)
            for side in ("chosen", "rejected"):
                jobs.append((i, side, *scorer.encode(pair.prompt, getattr(pair, side))))
        except DataError as e:
            message = str(e) if str(e).startswith(where) else f"{where}: {e}"
            if cfg.on_bad_row == "error":
                raise DataError(f"{message} (on_bad_row=skip writes an error row instead)") from None
            errors[i] = message
    with Progress() as progress:
        rewards = scorer.score([ids for *_, ids in jobs], progress)
    results: dict[int, dict[str, Any]] = {}
    for (i, side, text, _), reward in zip(jobs, rewards):
        out = results.setdefault(i, {})
        for key, value in (
            ("reward", float(reward)),
            ("reward_normalized", scorer.normalized(float(reward))),
            ("text", text),
        ):
            if value is not None:
                out[key] = value if side is None else {**out.get(key, {}), side: value}
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    with open(cfg.output, "w", encoding="utf-8") as f:
        for i, (_, row) in enumerate(rows):
            base = dict(row) if isinstance(row, dict) else {"input": row.row if isinstance(row, BadRow) else row}
            extra = {"error": errors[i]} if i in errors else results[i]
            f.write(json.dumps({**base, **extra}, ensure_ascii=False) + "\n")
    counts = {"rows": len(rows), "scored": len(results), "errors": len(errors)}
    log.info("scored %(scored)d of %(rows)d rows (%(errors)d errors) -> %(out)s", {**counts, "out": cfg.output})
    return counts


@hydra.main(version_base="1.3", config_path="../conf", config_name="score")
def main(cfg: DictConfig) -> None:
    score_file(cfg)


if __name__ == "__main__":
    main()
