"""Train a reward model: `python -m rewardlab.train [group=option ...] [key=value ...]`.

Builds everything from `conf/train.yaml` with `hydra.utils.instantiate`, fits, tests when a test
split exists, and writes `results.json` into the run folder. Console script: `rewardlab-train`.
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from rewardlab.analysis import attribute_errors, length_accuracy, pearson, uncertainty_accuracy
from rewardlab.callbacks import Throughput
from rewardlab.checkpoints import UntrustedCheckpoint, checkpoint_file, linear_head, read_checkpoint, stored_config
from rewardlab.checks import ConfigError
from rewardlab.data.module import PreferenceDataModule
from rewardlab.errors import UserError, one_line_errors
from rewardlab.model import RewardModel
from rewardlab.progress import duration
from rewardlab.redaction import redact
from rewardlab.run import build, build_trainer, finish_loggers, loss_learns, predict_ratings
from rewardlab.runfolder import claimed

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a job ended by SIGTERM


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    return {
        "params/total": sum(p.numel() for p in model.parameters()),
        "params/trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def resume_path(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from: `ckpt_path` itself, or for `last` the newest of this run folder's
    `checkpoints/last.ckpt` and Lightning's SLURM `hpc_ckpt_*.ckpt` (none yet: a fresh start)."""
    if cfg.ckpt_path is None:
        return None
    if cfg.ckpt_path == "last":
        out = Path(cfg.paths.output_dir)
        found = [p for p in [out / "checkpoints" / "last.ckpt", *out.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
        if not found:
            log.info("ckpt_path=last: no checkpoint in %s yet, starting fresh", out)
            return None
        newest = max(found, key=lambda p: p.stat().st_mtime)
        log.info("ckpt_path=last: resuming from %s", newest)
        return str(newest)
    return str(checkpoint_file(cfg.ckpt_path))


# Settings a resumed run may change without asking: where files go and how fast it runs, not what it learns.
FREE_ON_RESUME = {
    "backbone.attn_implementation",
    "data.cache_dir",
    "data.report_dir",
    "data.num_workers",
    "data.eval_batch_size",
    "data.eval_max_tokens",
    "backbone.cache_dir",
    "model.feature_cache_dir",
    "model.compile",
    "model.gradient_checkpointing",
    "model.checkpoint_above_tokens",  # in checkpoints from before it was removed
    "model.share_prompt",
}
COMPARED_ON_RESUME = ("seed", "data", "backbone", "loss", "freeze", "optimizer", "scheduler", "model", "head")
TRAINER_ON_RESUME = ("precision", "gradient_clip_val", "gradient_clip_algorithm", "accumulate_grad_batches")
TRAINER_ON_RESUME += ("max_epochs", "max_steps")
# Changes a checkpoint's weights or optimizer state cannot take, even when asked for.
FIXED_ON_RESUME = ("backbone.", "freeze.", "optimizer._target_", "head._target_", "head.k")


def _flat(node: Any, key: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for name, value in node.items() for k, v in _flat(value, f"{key}.{name}" if key else name).items()}
    return {key: node}


def resume_changes(cfg: DictConfig, ckpt_path: str) -> list[str]:
    """What this command would train differently from the checkpoint's run, as `key: old -> new`.
    Refused unless `resume.allow_changes=true`; changes the weights or the optimizer state cannot
    take (another backbone, freezing strategy or optimizer) are refused even then."""
    checkpoint = read_checkpoint(ckpt_path)
    stored = stored_config(checkpoint, ckpt_path)
    position = checkpoint.get("PreferenceDataModule", {})
    keys = ("epoch", "batches_trained", "batches_per_epoch")
    if position and not (isinstance(position, dict) and all(isinstance(position.get(k), int) for k in keys)):
        raise UntrustedCheckpoint(f"{ckpt_path}: its data position is not {{{', '.join(keys)}}} as integers")
    groups = [g.get("name") for state in checkpoint.get("optimizer_states", []) for g in state.get("param_groups", [])]
    if groups and ("loss" in groups) != loss_learns(cfg):
        has, learns = ("has a", "no") if "loss" in groups else ("has no", "a")
        raise ConfigError(
            f"ckpt_path={ckpt_path}: its optimizer {has} group for the loss's own parameter, and this run's loss "
            f"learns {learns} parameter (loss=bt_ties does; a bt_ties run from before log ν trained at loss.lr has "
            "no such group), so it cannot resume: evaluate or export it, or start a new run"
        )
    current = redact(OmegaConf.to_container(cfg, resolve=True))
    keep = set(COMPARED_ON_RESUME) | {f"trainer.{k}" for k in TRAINER_ON_RESUME}

    def compared(config: dict[str, Any]) -> dict[str, Any]:
        flat = _flat({k: v for k, v in config.items() if k in COMPARED_ON_RESUME or k == "trainer"})
        return {k: v for k, v in flat.items() if k not in FREE_ON_RESUME and (k in keep or k.split(".")[0] in keep)}

    if "head" not in stored:
        stored = {**stored, "head": linear_head()}
    before, after = compared(stored), compared(current)
    changes = [
        f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(before | after) if before.get(k) != after.get(k)
    ]
    if not changes:
        return []
    fixed = [c for c in changes if c.startswith(FIXED_ON_RESUME)]
    if fixed or not cfg.resume.allow_changes:
        raise ConfigError(
            f"ckpt_path={ckpt_path}: this command would train differently from the run it resumes:\n  "
            + "\n  ".join(changes)
            + (
                "\nthe checkpoint's weights or optimizer state cannot take these: " + ", ".join(fixed)
                if fixed
                else "\nresume with the same settings, or set resume.allow_changes=true to apply the new ones"
            )
        )
    log.warning("resuming with changed settings (resume.allow_changes=true):\n  %s", "\n  ".join(changes))
    return changes


def continue_as_trained(cfg: DictConfig, ckpt_path: str | None) -> None:
    """A resumed run with `trainer.precision=auto` keeps the precision it trained with (auto may decide
    otherwise on another machine), and its attention implementation where that is auto too."""
    if ckpt_path is None:
        return
    stored = stored_config(read_checkpoint(ckpt_path), ckpt_path)
    if cfg.trainer.precision == "auto" and "precision" in stored.get("trainer", {}):
        cfg.trainer.precision = stored["trainer"]["precision"]
    if cfg.backbone.get("attn_implementation") == "auto" and "attn_implementation" in stored["backbone"]:
        cfg.backbone.attn_implementation = stored["backbone"]["attn_implementation"]


def fit_and_test(
    cfg: DictConfig, trainer: L.Trainer, datamodule: PreferenceDataModule, model: RewardModel, ckpt_path: str | None
) -> dict[str, Any]:
    """Fit (resuming from `ckpt_path`), then test the best checkpoint when there is a test split."""
    if ckpt_path is not None and resume_changes(cfg, ckpt_path):
        model.apply_settings_on_resume = True
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    results: dict[str, Any] = {k: v.item() for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best and Path(best).is_file() and trainer.is_global_zero:
        results["best_checkpoint"] = str(link_best(Path(best)))
    if cfg.test and datamodule.has_test():
        if Path(best).is_file():  # memory-mapped: the weights are read, the optimizer state never is
            model.load_state_dict(torch.load(best, map_location="cpu", mmap=True, weights_only=True)["state_dict"])
        trainer.test(model, datamodule=datamodule, ckpt_path=best if best and not Path(best).is_file() else None)
        results |= {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        results["test/checkpoint"] = best or "final weights"
        outcomes = {k: v.numpy() for k, v in model.test_outcomes.compute().items()}  # every rank: it gathers
        if trainer.is_global_zero:
            results |= write_test_pairs(Path(cfg.paths.output_dir), datamodule, outcomes["index"], outcomes["margin"])
            results |= test_analysis(outcomes, cfg.uncertainty_quantiles)
        ratings = datamodule.lists.get("test")
        if ratings is not None and ratings.targets.shape[1] and trainer.is_global_zero:  # each attribute's errors
            model.eval()
            predicted, targets = predict_ratings(model, datamodule.lists["test"], datamodule.list_collator)
            errors = attribute_errors(predicted, targets, model.head.names)
            results |= {f"test/{k}": v for k, v in errors.items()}
    return results


def link_best(best: Path) -> Path:
    """`checkpoints/best.ckpt`, a relative link to the best checkpoint (a copy where links are not
    allowed), so commands can name it without listing the folder; replaced atomically."""
    link = best.parent / "best.ckpt"
    if best == link:
        return link
    tmp = best.parent / f".best.ckpt.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        tmp.symlink_to(best.name)
    except OSError:
        shutil.copyfile(best, tmp)
    os.replace(tmp, link)
    return link


def test_analysis(outcomes: dict[str, np.ndarray], quantiles: int) -> dict[str, float]:
    """Length-controlled accuracy and the reward–length correlation of the test pairs and, for a head with
    uncertainty, its mean, AUROC as a predictor of a wrong pair (beside the AUROC of a small |margin|, the
    model's own confidence, for comparison) and accuracy per quantile: from each pair once, like `test/acc`."""
    margin, tokens = outcomes["margin"], np.concatenate([outcomes["chosen_tokens"], outcomes["rejected_tokens"]])
    lengths = length_accuracy(margin, outcomes["chosen_tokens"], outcomes["rejected_tokens"])
    out = {f"test/{k}": lengths[k] for k in ("acc_chosen_longer", "acc_chosen_shorter", "acc_length_controlled",
                                             "pairs_chosen_longer", "pairs_chosen_shorter")}  # fmt: skip
    out["test/length_reward_corr"] = pearson(tokens, np.concatenate([outcomes["chosen"], outcomes["rejected"]]))
    uncertainty = outcomes["uncertainty"]
    if len(uncertainty) and not np.isnan(uncertainty).any():
        found = uncertainty_accuracy(margin, uncertainty, quantiles)
        out |= {"test/uncertainty": found["uncertainty_mean"], "test/uncertainty_auroc": found["uncertainty_auroc"]}
        out["test/margin_auroc"] = found["margin_auroc"]
        out |= {f"test/acc_uncertainty_q{row['quantile']}": row["accuracy"] for row in found["accuracy_by_uncertainty"]}
    return {k: v for k, v in out.items() if np.isfinite(v)}  # a side with no pair: no value


def write_test_pairs(folder: Path, datamodule: PreferenceDataModule, index: np.ndarray, margin: np.ndarray) -> dict:
    """`test_pairs.csv`: each test pair's row (1-based, in reading order; for pairs made of rankings or
    ratings, `pair`: which responses, `row:i>j` or `row>row`), whether the chosen response scored strictly
    higher, and the margin; with the test data's content hash, so `rewardlab.report` compares runs pair by
    pair only when they were scored on the same pairs."""
    dataset = datamodule.datasets["test"]
    keys = dataset.pair_keys(index.tolist())
    with open(folder / "test_pairs.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["row" if dataset.keys is None else "pair", "correct", "margin"])
        out.writerows(zip(keys, (margin > 0).astype(int).tolist(), margin.tolist()))
    # Each pair once: on several devices the sampler repeats a pair to even out the last batch.
    return {
        "test/pairs_file": "test_pairs.csv",
        "test/acc": float((margin > 0).mean()),
        "test/data_hash": datamodule.fingerprint("test"),  # computed when the split was cached
    }


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and test) as configured in a run folder this process holds; write and return
    `results.json`. A finished run resumed again is left as it is (its results are returned)."""
    output = Path(cfg.paths.output_dir).resolve()
    here = cfg.ckpt_path == "last" or (
        cfg.ckpt_path is not None and Path(cfg.ckpt_path).resolve().is_relative_to(output)
    )
    with claimed(cfg, "results.json", resuming=here) as finished:
        if finished:
            return json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
        return _train(cfg)


def _train(cfg: DictConfig) -> dict[str, Any]:
    """The experiment loggers are always closed with the run's exit status, and a failure is logged
    to the run's log file."""
    started = time.time()
    loggers: list[Logger] = []
    try:
        L.seed_everything(cfg.seed, workers=True)
        ckpt_path = resume_path(cfg)
        continue_as_trained(cfg, ckpt_path)
        datamodule, model = build(cfg)
        callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None]
        loggers = [  # redacted: wandb tags and names hold this job's overrides, resolved
            instantiate(redact(OmegaConf.to_container(c, resolve=True))) for c in (cfg.logger or {}).values() if c
        ]
        trainer = build_trainer(cfg, callbacks=callbacks, logger=loggers or False)
        params = count_parameters(model)
        log.info("parameters: %d total, %d trainable", params["params/total"], params["params/trainable"])
        for lg in trainer.loggers:
            lg.log_hyperparams({**model.run_config, **params})
        results = fit_and_test(cfg, trainer, datamodule, model, ckpt_path)
        for callback in callbacks:
            if isinstance(callback, Throughput):
                results |= callback.results()
        results |= (
            params
            | datamodule.counts()
            | model.feature_cache_stats()
            | {
                "train/skipped_nonfinite": model.skipped_nonfinite,
                "global_step": trainer.global_step,
                "peak_rss_mb": peak_rss_mb(),
                "wall_s": time.time() - started,
            }
        )
        if trainer.is_global_zero:
            numbers = {k: v for k, v in results.items() if isinstance(v, (int, float))}
            for lg in trainer.loggers:
                lg.log_metrics(numbers, step=trainer.global_step)
            path = Path(cfg.paths.output_dir) / "results.json"
            path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
            log.info("%s", summary_line(results, path))
    except SIGTERMException:
        log.warning(
            "stopped by SIGTERM; resume with ckpt_path=%s (or ckpt_path=last with hydra.run.dir=%s)",
            Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt",
            cfg.paths.output_dir,
        )
        finish_loggers(loggers, exit_code=PREEMPTED_EXIT_CODE)
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    except BaseException as e:
        user_error = isinstance(e, (UserError, InterpolationResolutionError))  # a bad `${...}`: the user's setting
        log.error("run failed: %s: %s", type(e).__name__, redact(str(e)), exc_info=not user_error)
        finish_loggers(loggers, exit_code=1)
        raise
    finish_loggers(loggers, exit_code=0)
    return results


def summary_line(results: dict[str, Any], path: Path) -> str:
    """The end of a run in one line, before the loggers' own summaries."""

    def number(key: str) -> str:
        value = results.get(key)
        return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"

    return (
        f"done in {duration(results['wall_s'])}: val/acc_best {number('val/acc_best')}, test/acc {number('test/acc')}; "
        f"best checkpoint {results.get('best_checkpoint', 'none')}; results {path}"
    )


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@one_line_errors
def main(cfg: DictConfig) -> float | None:
    try:
        results = train(cfg)
    finally:  # Lightning's objects refer to each other in cycles: free this job's model, optimizer state,
        gc.collect()  # data maps and open files now, not with the next multirun job already loaded
    metric = cfg.get("optimized_metric")
    return results.get(metric) if metric else None


if __name__ == "__main__":
    main()
