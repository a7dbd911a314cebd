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
from omegaconf import DictConfig
from rich.progress import Progress

from rewardlab.data.rows import BadRow, DataError, Pair, check_row, detect_schema
from rewardlab.data.sources import read_source
from rewardlab.scoring import Scorer

log = logging.getLogger(__name__)


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


@hydra.main(version_base="1.3", config_path="conf", config_name="score")
def main(cfg: DictConfig) -> None:
    score_file(cfg)


if __name__ == "__main__":
    main()
