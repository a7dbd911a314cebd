"""Export a trained reward model as a Hugging Face folder:
`python -m rewardlab.export ckpt_path=... output_dir=DIR`.

`AutoModelForSequenceClassification.from_pretrained(DIR)` loads it with `num_labels=1`, the trained
head under the family's own name (`score` for Llama, GPT-2, ...), the tokenizer with its chat
template and a pad token that never occurs in real text (transformers finds the last token as the
last one that is not `pad_token_id`; TRL builds the attention mask from it), and reward
normalisation statistics in the config. LoRA adapters are merged first. The model's one logit is the
head's reward (an ensemble's mean, ODIN's quality output); an ensemble's heads also travel in
`rewardlab_heads.safetensors`, so `score` and `serve` report their spread.

The export checks itself: rewardlab and plain transformers score the same token ids, right- and
left-padded, and must agree to `tolerance`. A family whose `*ForSequenceClassification` reads
another position (BERT's [CLS] pooler, GPT-2's absolute positions under left padding) is written
with a 40-line `modeling_rewardlab.py` instead, loaded with `trust_remote_code=True`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from rewardlab import __version__
from rewardlab.data.batching import pad_sequences
from rewardlab.errors import one_line_errors
from rewardlab.heads import AttributesHead, Head
from rewardlab.model import RewardModel
from rewardlab.run import load_run, score_pairs, split_datamodule
from rewardlab.runfolder import claimed
from rewardlab.scoring import HEAD_ENTRY, HEADS_FILE, head_module_name, modeling_module

log = logging.getLogger(__name__)

PAD_TOKEN = "<|reward_pad|>"
EXPORT_FILE = "rewardlab_export.json"


def merged_backbone(model: RewardModel) -> PreTrainedModel:
    """The backbone with LoRA adapters (if any) folded into its weights."""
    backbone = model.backbone
    return backbone.merge_and_unload() if hasattr(backbone, "merge_and_unload") else backbone


def choose_pad(tokenizer: PreTrainedTokenizerBase, sequences: list[np.ndarray]) -> bool:
    """Give the tokenizer a pad token that never occurs in formatted text; True if one was added.

    Its pad can stay when it is a token of its own (not EOS/BOS/SEP/CLS) and absent from the data;
    otherwise (SmolLM2 pads with its EOS `<|im_end|>`) a new special token is added.
    """
    pad = tokenizer.pad_token_id
    structural = {tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.sep_token_id, tokenizer.cls_token_id}
    if pad is not None and pad not in structural and not any((s == pad).any() for s in sequences):
        return False
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return True


def native_model(backbone: PreTrainedModel, weight: torch.Tensor) -> PreTrainedModel | None:
    """The family's own *ForSequenceClassification with the trained weights, or None if it has none."""
    config = backbone.config.__class__.from_dict(backbone.config.to_dict())
    config.num_labels = 1
    try:
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    except ValueError:
        return None
    missing, unexpected = model.base_model.load_state_dict(backbone.state_dict(), strict=False)
    try:
        head = model.get_submodule(head_module_name(model))
    except ValueError:
        return None
    if unexpected or any("pooler" not in k for k in missing):
        return None
    with torch.no_grad():
        head.weight.copy_(weight)
        if head.bias is not None:
            head.bias.zero_()
    return model


def remote_code_model(backbone: PreTrainedModel, weight: torch.Tensor, pooling: str) -> PreTrainedModel:
    """rewardlab's own model (`rewardlab.scoring.MODELING`) with the trained weights and pooling."""
    module = modeling_module(backbone.config.model_type)
    module.RewardlabConfig.register_for_auto_class()
    module.RewardlabForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
    config = module.RewardlabConfig.from_dict(backbone.config.to_dict())
    config.num_labels = 1
    config.rewardlab_pooling = pooling
    model = module.RewardlabForSequenceClassification(config)
    model.model.load_state_dict(backbone.state_dict(), strict=False)
    with torch.no_grad():
        model.score.weight.copy_(weight)
    return model


@torch.inference_mode()
def parity(model: PreTrainedModel, reference: torch.Tensor, sequences: list[np.ndarray], pad_id: int) -> float:
    """Largest |transformers − rewardlab| over the sequences, right- and left-padded."""
    diffs = {}
    for side in ("right", "left"):
        input_ids, attention_mask = pad_sequences(sequences, pad_id, side)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
        diffs[side] = float((logits - reference).abs().max())
    log.info(
        "%s: max |transformers - rewardlab| %.2e right-padded, %.2e left-padded",
        type(model).__name__,
        diffs["right"],
        diffs["left"],
    )
    return max(diffs.values())


def prepare(
    hf: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    added_pad: bool,
    reference: torch.Tensor,
    sample: list[np.ndarray],
) -> float:
    """Give the model the tokenizer's pad id (and a row for an added pad token); its parity."""
    if added_pad:
        hf.resize_token_embeddings(len(tokenizer))
    hf.config.pad_token_id = tokenizer.pad_token_id
    return parity(hf.eval(), reference, sample, tokenizer.pad_token_id)


def export(cfg: DictConfig) -> dict[str, Any]:
    """Write the Hugging Face folder and return what was written into its `config.rewardlab`."""
    out = Path(cfg.output_dir)
    check_output_dir(out, Path(cfg.ckpt_path), cfg.overwrite)
    run_cfg, model, tokenizer = load_run(cfg.ckpt_path, cfg.allow_targets, cfg.trust_remote_code, cfg.paths.cache_dir)
    split = cfg.normalize_split
    datamodule = split_datamodule(run_cfg.data, split, tokenizer, f"{cfg.paths.cache_dir}/tokenized", None)
    dataset = datamodule.datasets[split]
    scores = score_pairs(model, getattr(datamodule, f"{split}_dataloader")())
    rewards = np.concatenate([scores["chosen"], scores["rejected"]])
    sample = [dataset[i][side] for i in range(min(cfg.parity_pairs, len(dataset))) for side in ("chosen", "rejected")]
    with torch.inference_mode():
        reference = model(*pad_sequences(sample, tokenizer.pad_token_id))

    backbone = merged_backbone(model)
    added_pad = choose_pad(tokenizer, sample)
    remote = cfg.remote_code == "always"
    if model.pooling != "last":
        log.warning(
            "pooling %s: AutoModelForSequenceClassification gives this model's rewards (RewardBench, TRL's "
            "RewardTrainer), but TRL's PPO/RLOO get_reward and OpenRLHF read a score at the last token; "
            "for those, train with model.pooling=last",
            model.pooling,
        )
    weight = model.head.reward_weight().detach().float()
    hf = None if remote or model.pooling != "last" else native_model(backbone, weight)
    if hf is not None:
        diff = prepare(hf, tokenizer, added_pad, reference, sample)
        if diff > cfg.tolerance:
            log.info(
                "%s scores differently (max |diff| %.2e); writing rewardlab's modeling file", type(hf).__name__, diff
            )
            hf = None
    if hf is None:
        if cfg.remote_code == "never":
            raise ValueError(
                f"{type(backbone).__name__}: its *ForSequenceClassification does not give rewardlab's "
                "scores; export with remote_code=auto to write a modeling file instead"
            )
        hf, remote = remote_code_model(backbone, weight, model.pooling), True
        diff = prepare(hf, tokenizer, added_pad, reference, sample)
        if diff > cfg.tolerance:
            raise RuntimeError(f"export does not reproduce rewardlab's scores (max |diff| {diff:.2e})")

    settings = datamodule.settings
    info = {
        "version": __version__,
        "checkpoint": str(Path(cfg.ckpt_path).resolve()),
        "format": dataset.meta["format"],
        "chat_template": settings.chat_template,
        "max_length": settings.max_length,
        "truncation": settings.truncation,
        "special_tokens_in_text": settings.special_tokens_in_text,
        "remote_code": remote,
        "pooling": model.pooling,
        "normalization": {"split": split, "source": dataset.meta["source"], "responses": int(len(rewards))},
        "parity_max_abs_diff": diff,
        "head": heads_info(model.head, hf, cfg.dtype),
    }
    if model.head.carried:
        log.info("%s head: the model's logit combines %d outputs, which travel in %s",
                 model.head.kind, model.head.weight.shape[0], HEADS_FILE)  # fmt: skip
    hf.config.reward_mean = float(rewards.mean())
    hf.config.reward_std = float(rewards.std())
    hf.config.rewardlab = info
    if settings.chat_template:
        tokenizer.chat_template = settings.chat_template
    tokenizer.padding_side = "right"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf.to(getattr(torch, cfg.dtype)).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if info["head"]["file"]:
            weight = {"weight": model.head.weight.detach().float().contiguous()}
            save_file(weight, tmp / HEADS_FILE, metadata={HEAD_ENTRY: json.dumps(info["head"])})
        log.info(
            "exported %s (%s, parity %.1e, reward mean %.3f std %.3f) to %s",
            type(hf).__name__,
            "remote code" if remote else "native",
            diff,
            hf.config.reward_mean,
            hf.config.reward_std,
            out,
        )
        (tmp / EXPORT_FILE).write_text(
            json.dumps(
                {
                    **info,
                    "architecture": type(hf).__name__,
                    "reward_mean": hf.config.reward_mean,
                    "reward_std": hf.config.reward_std,
                    "pad_token": tokenizer.pad_token,
                    "files": sorted([p.name for p in tmp.iterdir()] + [EXPORT_FILE]),
                },
                indent=2,
            )
            + "\n"
        )
        share_like_other_files(tmp)
        replace_folder(tmp, out)
    finally:  # gone once renamed into place; removes a half-written export after an error
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def heads_info(head: Head, hf: PreTrainedModel, dtype: str) -> dict[str, Any]:
    """What the export says of the head: its kind and outputs, and for a head whose outputs travel (an
    ensemble's, the attributes') the file holding every output's weights (float32), the module of `hf` that
    computes the reward and the dtype the model was saved in (its weight is the reward's rounded to it); for
    attributes also their names, combination weights, means and stds."""
    return {
        "kind": head.kind,
        "outputs": int(head.weight.shape[0]),
        "file": HEADS_FILE if head.carried else None,
        "module": head_module_name(hf) if head.carried else None,
        "dtype": dtype if head.carried else None,
    } | (head.description() if isinstance(head, AttributesHead) else {})


def check_output_dir(out: Path, ckpt_path: Path, overwrite: bool) -> None:
    """Before any work: an export replaces only an earlier export (with `overwrite`), never other files,
    and never a folder holding the checkpoint it reads."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir={out} is a file, not a folder")
    if ckpt_path.resolve().is_relative_to(out.resolve()):
        raise FileExistsError(f"output_dir={out} holds the checkpoint being exported ({ckpt_path}); choose another")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output_dir={out} is not empty; set overwrite=true to replace an earlier export")
        if not (out / EXPORT_FILE).is_file():
            raise FileExistsError(
                f"output_dir={out} holds files that are not a rewardlab export (no {EXPORT_FILE}); "
                "overwrite=true replaces only an earlier export"
            )
        written = set(json.loads((out / EXPORT_FILE).read_text()).get("files", []))
        if others := sorted(p.name for p in out.iterdir() if p.name not in written):
            raise FileExistsError(
                f"output_dir={out} holds files the earlier export did not write ({', '.join(others[:5])}); "
                "overwrite=true replaces only what an export wrote: move them first"
            )


def share_like_other_files(folder: Path) -> None:
    """Permissions as the umask gives new files (the temporary folder was private), so another account
    (a serving user) can read the export as it could any folder this user writes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def replace_folder(tmp: Path, out: Path) -> None:
    """Put the finished export in place: the earlier one, if any, is removed only once the new one is there."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
@one_line_errors
def main(cfg: DictConfig) -> None:
    with claimed(cfg, results=None):
        export(cfg)


if __name__ == "__main__":
    main()
