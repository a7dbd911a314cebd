"""Evaluate a trained reward model: `python -m rewardlab.eval ckpt_path=... [data.test_file=...]`.

Scores every pair of a split and writes `eval.json`, `rewards.jsonl` (one line per pair) and two
plots into the run folder: accuracy (strict: a tie is wrong), ties, mean margin, loss, accuracy
per `subset`, calibration of σ(r_w − r_l) (ECE and a reliability diagram), the reward
distributions of chosen and rejected, and length bias: how often the longer response wins, accuracy
where the chosen response is the longer vs the shorter and their mean (length-controlled accuracy),
accuracy by length gap, how reward correlates with response length, and optionally accuracy after
removing the reward's linear length trend fitted on another split (`length_calibration=val`). For an
ensemble head: mean uncertainty, its AUROC as a predictor of a wrong pair, accuracy by uncertainty
quantile. Rewards do not depend on batch size or padding side.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from rewardlab.analysis import gap_bins, length_accuracy, length_slope, pearson, uncertainty_accuracy
from rewardlab.checks import check_ranges
from rewardlab.data.cache import PairDataset
from rewardlab.errors import one_line_errors
from rewardlab.run import finish_loggers, load_run, score_pairs, split_datamodule
from rewardlab.runfolder import claimed

log = logging.getLogger(__name__)


def calibration(p_chosen: np.ndarray, bins: int) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error of the Bradley–Terry probability σ(r_w − r_l).

    Every pair's prediction is the side the model prefers, with confidence max(p, 1 − p); bins over
    [0.5, 1] compare the mean confidence with the fraction of pairs predicted right (a tie is wrong).
    """
    confidence = np.maximum(p_chosen, 1 - p_chosen)
    correct = p_chosen > 0.5
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            conf, acc = float(confidence[mask].mean()), float(correct[mask].mean())
            ece += mask.mean() * abs(acc - conf)
            table.append(
                {
                    "low": float(edges[b]),
                    "high": float(edges[b + 1]),
                    "pairs": int(mask.sum()),
                    "confidence": conf,
                    "accuracy": acc,
                }
            )
    return float(ece), table


def response_tokens(dataset: PairDataset, index: np.ndarray) -> np.ndarray:
    """`(pairs, 2)`: the response tokens (after the prompt) of chosen and rejected."""
    return dataset.seq_lengths[index] - dataset.prompt_lengths[index, None]


def metrics(
    scores: dict[str, np.ndarray], dataset: PairDataset, bins: int, gap_edges: list[int], quantiles: int
) -> dict[str, Any]:
    """Everything `eval.json` reports, from the rewards and the split's lengths and subsets."""
    c, r, idx = scores["chosen"], scores["rejected"], scores["index"]
    d = c - r
    p = 1 / (1 + np.exp(-d))
    ece, table = calibration(p, bins)
    response = response_tokens(dataset, idx)
    longer = np.sign(response[:, 0] - response[:, 1])
    subsets = np.asarray(dataset.meta["subsets"], dtype=object)[dataset.subset[idx]] if dataset.meta["subsets"] else []
    per_subset = {name: float((d[subsets == name] > 0).mean()) for name in sorted(set(subsets)) if name}
    return {
        "pairs": int(len(d)),
        "accuracy": float((d > 0).mean()),
        "ties": int((d == 0).sum()),
        "mean_margin": float(d.mean()),
        "loss": float(np.logaddexp(0, -d).mean()),
        "reward_chosen_mean": float(c.mean()),
        "reward_rejected_mean": float(r.mean()),
        "reward_mean": float(np.concatenate([c, r]).mean()),
        "reward_std": float(np.concatenate([c, r]).std()),
        "ece": ece,
        "calibration": table,
        "accuracy_per_subset": per_subset,
        "longer_wins_accuracy": float(((longer > 0) + 0.5 * (longer == 0)).mean()),
        "length_ties": int((longer == 0).sum()),
        "length_reward_correlation": pearson(response.ravel().astype(float), np.stack([c, r], 1).ravel()),
        "length_margin_correlation": pearson((response[:, 0] - response[:, 1]).astype(float), d),
        **length_accuracy(d, response[:, 0], response[:, 1]),
        "accuracy_by_length_gap": gap_bins(d, response[:, 0], response[:, 1], gap_edges),
        **(uncertainty_accuracy(d, scores["uncertainty"], quantiles) if "uncertainty" in scores else {}),
    }


def length_calibrated(
    scores: dict[str, np.ndarray], dataset: PairDataset, reference: dict[str, np.ndarray], ref_dataset: PairDataset
) -> dict[str, float]:
    """Post-hoc length calibration: the slope of reward on response tokens fitted over every response of
    `reference` (another split), that trend removed from this split's rewards, and what is left."""
    ref_tokens = response_tokens(ref_dataset, reference["index"])
    slope = length_slope(np.stack([reference["chosen"], reference["rejected"]], 1).ravel(), ref_tokens.ravel())
    response = response_tokens(dataset, scores["index"])
    c = scores["chosen"] - slope * response[:, 0]
    r = scores["rejected"] - slope * response[:, 1]
    return {
        "slope_per_token": slope,
        "accuracy": float((c - r > 0).mean()),
        "acc_length_controlled": length_accuracy(c - r, response[:, 0], response[:, 1])["acc_length_controlled"],
        "length_reward_correlation": pearson(response.ravel().astype(float), np.stack([c, r], 1).ravel()),
    }


def finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such a number (an empty bin's accuracy) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def plot(result: dict[str, Any], scores: dict[str, np.ndarray], out: Path) -> list[Path]:
    """reliability.png (confidence against accuracy per bin) and rewards.png (histograms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5))
    table = result["calibration"]
    ax.plot([0.5, 1], [0.5, 1], "--", color="gray", label="perfectly calibrated")
    ax.plot([t["confidence"] for t in table], [t["accuracy"] for t in table], "o-", label="model")
    for t in table:
        ax.annotate(
            str(t["pairs"]), (t["confidence"], t["accuracy"]), fontsize=7, xytext=(3, -9), textcoords="offset points"
        )
    ax.set(
        xlabel="confidence max(σ(r_w − r_l), 1 − σ(r_w − r_l))",
        ylabel="accuracy",
        title=f"reliability (ECE {result['ece']:.3f})",
        xlim=(0.48, 1.02),
        ylim=(0, 1.02),
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    lo = min(scores["chosen"].min(), scores["rejected"].min())
    hi = max(scores["chosen"].max(), scores["rejected"].max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1, 41)
    ax.hist(scores["chosen"], bins=edges, alpha=0.6, label="chosen")
    ax.hist(scores["rejected"], bins=edges, alpha=0.6, label="rejected")
    ax.set(xlabel="reward", ylabel="responses", title=f"reward distributions (accuracy {result['accuracy']:.3f})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rewards.png", dpi=120)
    plt.close(fig)
    return [out / "reliability.png", out / "rewards.png"]


def evaluate(cfg: DictConfig, data_overrides: list[str]) -> dict[str, Any]:
    """Score `cfg.split` with the checkpoint's model; write eval.json, rewards.jsonl and plots.

    `data_from: checkpoint` takes the trained run's data settings with the `data.*` overrides given
    on the command line on top (so tokenization matches training unless you change it);
    `data_from: config` takes conf/data as composed for this command."""
    check_ranges(cfg)  # the analysis settings, before the model is loaded
    run_cfg, model, tokenizer = load_run(cfg.ckpt_path, cfg.allow_targets, cfg.trust_remote_code, cfg.paths.cache_dir)
    if cfg.data_from == "config":
        data = cfg.data
    elif cfg.data_from == "checkpoint":
        data = OmegaConf.merge(run_cfg.data, OmegaConf.from_dotlist([o[len("data.") :] for o in data_overrides]))
    else:
        raise ValueError(f"data_from: unknown {cfg.data_from!r}; expected checkpoint or config")
    datamodule = split_datamodule(data, cfg.split, tokenizer, cfg.data.cache_dir, cfg.paths.output_dir)
    split_file = datamodule.files[cfg.split]
    dataset = datamodule.datasets[cfg.split]
    every = score_pairs(model, getattr(datamodule, f"{cfg.split}_dataloader")(), bf16=cfg.bf16)
    tie = dataset.tie[every["index"]]
    scores = {name: values[~tie] for name, values in every.items()}  # accuracy and the rest: decisive pairs
    result = {
        "checkpoint": str(cfg.ckpt_path),
        "split": cfg.split,
        "data": split_file,
        **metrics(scores, dataset, cfg.calibration_bins, list(cfg.length_gap_edges), cfg.uncertainty_quantiles),
    }
    if tie.any():  # tie pairs apart: how many, and how close the model scores their two responses
        margin = every["chosen"][tie] - every["rejected"][tie]
        result |= {"tie_pairs": int(tie.sum()), "tie_abs_margin": float(np.abs(margin).mean())}
    if cfg.length_calibration is not None:
        result["length_calibrated"] = calibrate(cfg, data, tokenizer, model, scores, dataset)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(finite(result), indent=2) + "\n")
    with open(out / "rewards.jsonl", "w") as f:
        subsets = dataset.meta["subsets"]
        extra = [k for k in ("uncertainty", "chosen_std", "rejected_std") if k in every]
        for k, i in enumerate(every["index"]):
            subset = subsets[dataset.subset[i]] if subsets else ""
            row = {"row": int(dataset.row[i]), "subset": subset, "chosen": every["chosen"][k]}
            row |= {"rejected": every["rejected"][k], **{name: every[name][k] for name in extra}}
            row |= {"tie": bool(tie[k])} if tie.any() else {}
            f.write(json.dumps(row) + "\n")
    images = plot(result, scores, out)
    loggers = [instantiate(c) for c in (cfg.logger or {}).values() if c is not None]
    for lg in loggers:
        lg.log_metrics({f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))})
        if isinstance(lg, WandbLogger):
            lg.log_image("eval/plots", [str(p) for p in images])
    finish_loggers(loggers, exit_code=0)
    log.info(
        "eval: accuracy %.4f on %d pairs (%s), length-controlled %.4f (%d pairs chosen longer, %d shorter), "
        "ECE %.4f, longer-wins %.4f -> %s",
        result["accuracy"],
        result["pairs"],
        split_file,
        result["acc_length_controlled"],
        result["pairs_chosen_longer"],
        result["pairs_chosen_shorter"],
        result["ece"],
        result["longer_wins_accuracy"],
        out / "eval.json",
    )
    return result


def calibrate(
    cfg: DictConfig, data: DictConfig, tokenizer: Any, model: Any, scores: dict[str, np.ndarray], dataset: PairDataset
) -> dict[str, Any]:
    """`length_calibration=<split>`: fit the length trend on that split of the same data, apply it here."""
    split = cfg.length_calibration
    if split == cfg.split:
        log.warning("length_calibration=%s is the evaluated split: the length trend is fitted in-sample", split)
    reference_data = split_datamodule(data, split, tokenizer, cfg.data.cache_dir, None)
    reference = score_pairs(model, getattr(reference_data, f"{split}_dataloader")(), bf16=cfg.bf16)
    found = length_calibrated(scores, dataset, reference, reference_data.datasets[split])
    log.info(
        "length calibration on %s: %.4f reward per token removed; accuracy %.4f, length-controlled %.4f",
        split,
        found["slope_per_token"],
        found["accuracy"],
        found["acc_length_controlled"],
    )
    return {"split": split, "data": reference_data.files[split], **found}


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@one_line_errors
def main(cfg: DictConfig) -> None:
    with claimed(cfg, results="eval.json"):
        evaluate(cfg, [o for o in HydraConfig.get().overrides.task if o.startswith("data.")])


if __name__ == "__main__":
    main()
