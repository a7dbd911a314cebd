"""Scoring with an exported model folder, shared by `score`, `serve` and `export`'s self-check.

Opening a folder runs no code from it: a native export loads with plain transformers, and one that
carries rewardlab's `modeling_rewardlab.py` is opened only if that file is exactly what
`rewardlab.export` writes for its backbone family; its classes then come from rewardlab itself, so
no `trust_remote_code` is needed. Texts are formatted and truncated by `rewardlab.data.formatting`,
as in training. An ensemble's export also carries every head (`rewardlab_heads.safetensors`, plain
tensors): scoring then reads the reward module's input as well and reports the heads' spread. No
Lightning here.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import math
import reprlib
import shutil
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from rewardlab.data.batching import pad_sequences
from rewardlab.data.formatting import Formatter, truncate
from rewardlab.data.rows import DataError
from rewardlab.errors import UserError
from rewardlab.heads import AttributesHead, EnsembleHead, Head
from rewardlab.pooling import last_token_index

log = logging.getLogger(__name__)

MODELING_FILE = "modeling_rewardlab.py"
HEADS_FILE = "rewardlab_heads.safetensors"
HEAD_ENTRY = "rewardlab.head"  # the heads file's own copy of config.json's entry, so an edit to either is seen
AUTO_MAP = {
    "AutoConfig": "modeling_rewardlab.RewardlabConfig",
    "AutoModelForSequenceClassification": "modeling_rewardlab.RewardlabForSequenceClassification",
}
MODELING = '''"""A reward model written by rewardlab.export: the backbone's hidden state at the last
non-padding token (found from the attention mask; or their mean, or the first token's, as
`config.rewardlab_pooling` says), through a linear head `score`. Used for families whose own
*ForSequenceClassification reads another position. Its own model_type makes
loading without trust_remote_code=True fail loudly instead of building an untrained model."""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import {config_class} as _Config
from transformers import {model_class} as _Model
from transformers.modeling_outputs import SequenceClassifierOutput


class RewardlabConfig(_Config):
    model_type = "rewardlab_{family}"


class RewardlabForSequenceClassification(PreTrainedModel):
    config_class = RewardlabConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = _Model(config)
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # the reward reads the hidden states, not the [CLS] pooler
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:  # count real tokens only, so left padding gives the same reward
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            **kwargs).last_hidden_state
        pooling = getattr(self.config, "rewardlab_pooling", "last")
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if pooling == "mean":
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1)
        elif pooling == "first":
            pooled = hidden[rows, attention_mask.int().argmax(-1)]
        else:
            pooled = hidden[rows, attention_mask.shape[-1] - 1 - attention_mask.flip(-1).int().argmax(-1)]
        return SequenceClassifierOutput(logits=self.score(pooled))
'''


class UntrustedExport(UserError, ValueError):
    """An export folder that would make loading it run code rewardlab did not write."""


def modeling_source(family: str) -> str:
    """rewardlab's modeling file for a transformers backbone family (`bert`, `gpt2`, ...); the class
    names come from transformers' own registry, never from a file."""
    if family not in CONFIG_MAPPING:
        raise UntrustedExport(f"unknown backbone family {family!r}")
    config_class = CONFIG_MAPPING[family]
    if config_class not in MODEL_MAPPING:
        raise UntrustedExport(f"backbone family {family!r} has no base model class in transformers")
    return MODELING.format(
        config_class=config_class.__name__, model_class=MODEL_MAPPING[config_class].__name__, family=family
    )


def modeling_module(family: str) -> types.ModuleType:
    """rewardlab's modeling classes for `family`, built from rewardlab's own template (written to a
    private temporary file: transformers copies the source file of `sys.modules[cls.__module__]` when
    saving, so the module is registered anew for each family; the file goes when the process ends)."""
    folder = tempfile.mkdtemp(prefix="rewardlab-modeling-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = Path(folder) / MODELING_FILE
    path.write_text(modeling_source(family))
    spec = importlib.util.spec_from_file_location("modeling_rewardlab", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def open_export(folder: Path, trust_remote_code: bool, dtype: torch.dtype) -> tuple[PreTrainedModel, Any, dict]:
    """(model in eval mode, tokenizer, config.json) of a `rewardlab.export` folder, without running any
    code from it: a modeling file must be byte-identical to rewardlab's for its family, and a
    tokenizer may not name code of its own, unless this command passes `trust_remote_code=true`."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"model_dir={folder}: no config.json (expected a rewardlab.export folder)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("rewardlab"), dict):
        raise ValueError(f"model_dir={folder}: not written by rewardlab.export (no 'rewardlab' in config.json)")
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file() and "auto_map" in tokenizer_config.read_text(encoding="utf-8", errors="replace"):
        if not trust_remote_code:
            raise UntrustedExport(
                f"{tokenizer_config}: names tokenizer code of its own (auto_map), which rewardlab.export never "
                "writes; refusing to run it (pass trust_remote_code=true only if you trust this folder)"
            )
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if "auto_map" not in config:
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=dtype)
        return model.eval(), tokenizer, config
    family = str(config.get("model_type", "")).removeprefix("rewardlab_")
    modeling = folder / MODELING_FILE
    try:
        ours = config["auto_map"] == AUTO_MAP and modeling.read_text(encoding="utf-8") == modeling_source(family)
    except (OSError, UnicodeDecodeError, UntrustedExport):
        ours = False
    if ours:
        model = modeling_module(family).RewardlabForSequenceClassification.from_pretrained(folder, dtype=dtype)
    elif trust_remote_code:
        log.warning("%s: the modeling code is not rewardlab's; running it because trust_remote_code=true", folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True, dtype=dtype)
    else:
        raise UntrustedExport(
            f"{folder}: config.json's auto_map or {MODELING_FILE} is not what rewardlab.export writes for "
            f"model_type {config.get('model_type')!r}; loading it would run code from the folder, so nothing was "
            "loaded (pass trust_remote_code=true only if you trust this folder)"
        )
    return model.eval(), tokenizer, config


def head_module_name(model: PreTrainedModel) -> str:
    """The name of the module computing an exported model's one logit: its single-output linear layer
    outside the backbone."""
    found = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.out_features == 1 and not name.startswith(model.base_model_prefix)
    ]
    if len(found) != 1:
        raise ValueError(f"{type(model).__name__}: expected one single-output linear head, found {found}")
    return found[0]


SAVED_DTYPES = ("float32", "bfloat16", "float16")
HEAD_KINDS = ("linear", "ensemble", "odin", "attributes")
CARRIED = ("ensemble", "attributes")  # kinds whose outputs travel in the heads file


def open_heads(folder: Path, info: dict[str, Any], model: PreTrainedModel) -> tuple[Head, nn.Linear] | None:
    """An ensemble export's heads and the model's reward module, checked to agree (the mean of the heads,
    rounded to the dtype the export was saved in and then to the one loaded, is the module's weight bit for
    bit); None for an export with one head."""
    head = info.get("head")
    if head is None:  # exported before heads were a group: one linear head
        if (folder / HEADS_FILE).exists():
            raise UntrustedExport(f"{folder}: holds {HEADS_FILE} but config.json has no rewardlab.head entry")
        return None
    if not isinstance(head, dict) or head.get("kind") not in HEAD_KINDS:
        raise UntrustedExport(f"{folder}: config.json's rewardlab.head is not what rewardlab.export writes: {head!r}")
    if head["kind"] not in CARRIED:
        if head.get("file") is not None or (folder / HEADS_FILE).exists():
            raise UntrustedExport(
                f"{folder}: rewardlab.head.kind {head['kind']!r} carries no heads file, but one is named or present"
            )
        return None
    expected = {"file": HEADS_FILE, "module": "the name of the model's reward module", "dtype": "|".join(SAVED_DTYPES)}
    for key, what in expected.items():
        value = head.get(key)
        if not isinstance(value, str) or (key != "module" and value not in what.split("|")):
            raise UntrustedExport(
                f"{folder}: config.json's rewardlab.head.{key} is {value!r}, expected {what} (an export of an older "
                "rewardlab: export the checkpoint again)"
            )
    path = folder / HEADS_FILE
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
            recorded = (f.metadata() or {}).get(HEAD_ENTRY)
    except (OSError, SafetensorError) as e:
        raise UntrustedExport(f"{path}: not a rewardlab heads file ({type(e).__name__}: {e})") from None
    if set(tensors) != {"weight"} or tensors["weight"].dtype != torch.float32:
        found = {name: str(t.dtype).removeprefix("torch.") for name, t in tensors.items()}
        raise UntrustedExport(f"{path}: expected one float32 tensor 'weight', found {found}")
    weight = tensors["weight"]
    try:
        module = model.get_submodule(head["module"])
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear) or module.out_features != 1:
        raise UntrustedExport(f"{folder}: rewardlab.head.module {head['module']!r} is not the model's reward head")
    outputs, least = head.get("outputs"), 2 if head["kind"] == "ensemble" else 1
    if not isinstance(outputs, int) or isinstance(outputs, bool) or outputs < least:
        raise UntrustedExport(
            f"{folder}: config.json's rewardlab.head.outputs is {outputs!r}, expected an integer >= {least}"
        )
    if weight.shape != (outputs, module.in_features):
        raise UntrustedExport(
            f"{path}: expected weights of shape (rewardlab.head.outputs, hidden) = ({outputs}, {module.in_features}), "
            f"got {tuple(weight.shape)}"
        )
    if not weight.isfinite().all():
        raise UntrustedExport(f"{path}: holds weights that are not finite (NaN or infinity)")
    if head["kind"] == "ensemble":
        rebuilt: Head = EnsembleHead(weight.shape[1], None, weight.shape[0], bootstrap=False, seed=0)
    else:
        rebuilt = attributes_head(folder, head, weight.shape[1], outputs)
    rebuilt.weight.data.copy_(weight.float())
    saved = rebuilt.reward_weight().detach().to(getattr(torch, head["dtype"]))
    if not torch.equal(saved.to(module.weight.dtype), module.weight.detach().cpu()):
        what = "the mean of its heads" if head["kind"] == "ensemble" else "the combination of its attributes"
        raise UntrustedExport(f"{path}: {what} is not the model's reward head; not from this export")
    if recorded is None:
        raise UntrustedExport(
            f"{path}: records no {HEAD_ENTRY} entry (an export of an older rewardlab): export its checkpoint again, "
            "`python -m rewardlab.export ckpt_path=... output_dir=...`"
        )
    try:
        same = json.loads(recorded) == head  # the export wrote both from one dict: a difference is an edit
    except (ValueError, RecursionError):
        same = False
    if not same:
        raise UntrustedExport(
            f"{folder}: config.json's rewardlab.head differs from the entry {HEADS_FILE} records (or that entry "
            "is not readable JSON): one of them was edited after export; export the checkpoint again"
        )
    return rebuilt.eval().to(module.weight.device), module


def attributes_head(folder: Path, head: dict[str, Any], hidden: int, outputs: int) -> AttributesHead:
    """An attributes export's head from its config entry: names (distinct strings), combination weights,
    means and stds (finite numbers, stds > 0), one per output; anything else is refused, naming the key."""
    names = head.get("names")
    if not (isinstance(names, list) and len(names) == outputs and all(isinstance(n, str) and n for n in names)
            and len(set(names)) == outputs):  # fmt: skip
        raise UntrustedExport(f"{folder}: rewardlab.head.names is {names!r}, expected {outputs} distinct names")
    values = {}
    for key in ("combination", "mean", "std"):
        value = head.get(key)
        numbers = isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e30 for v in value
        )
        if not numbers or len(value) != outputs:
            raise UntrustedExport(
                f"{folder}: rewardlab.head.{key} is {reprlib.repr(value)}, expected {outputs} numbers within ±1e30"
            )
        values[key] = torch.tensor(value, dtype=torch.float32)
    if not bool((values["std"] > 0).all()):
        raise UntrustedExport(f"{folder}: rewardlab.head.std is {head['std']!r}, expected numbers > 0")
    rebuilt = AttributesHead(hidden, None, names, head["combination"], normalize=True)
    rebuilt.mean.copy_(values["mean"])
    rebuilt.std.copy_(values["std"])
    return rebuilt


def statistics(config: dict[str, Any], folder: str) -> tuple[float | None, float | None]:
    """The export's reward mean and std for normalising, or (None, None) with a warning when they are not a
    finite number and a finite number > 0 (an export without validation data has none)."""
    mean, std = config.get("reward_mean"), config.get("reward_std")
    if mean is None and std is None:
        return None, None
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (mean, std))
    if not numbers or std <= 0:
        log.warning("%s/config.json: reward_mean %r, reward_std %r are not usable statistics; no normalising",
                    folder, mean, std)  # fmt: skip
        return None, None
    return float(mean), float(std)


class Scorer:
    """An exported model folder: formats and tokenizes like training, scores in length-sorted batches."""

    def __init__(self, model_dir: str, trust_remote_code: bool, batch_size: int, dtype: str = "float32"):
        self.model, self.tokenizer, config = open_export(Path(model_dir), trust_remote_code, getattr(torch, dtype))
        self.info = config["rewardlab"]
        self.heads = open_heads(Path(model_dir), self.info, self.model)
        kind = self.heads[0].kind if self.heads is not None else None
        self.has_std = kind == "ensemble"  # rewards come with their heads' spread
        self.attributes = self.heads[0].names if kind == "attributes" else None  # and with predicted ratings
        if self.has_std:
            log.info(
                "%s: an ensemble of %d heads; rewards come with their spread", model_dir, self.heads[0].weight.shape[0]
            )
        if self.attributes:
            log.info("%s: rewards come with predicted %s", model_dir, ", ".join(self.attributes))
        self.mean, self.std = statistics(config, model_dir)
        self.max_length, self.batch_size = self.info["max_length"], batch_size
        self.formatter = Formatter(
            self.tokenizer,
            self.info["format"],
            self.info["chat_template"],
            self.max_length,
            self.info["special_tokens_in_text"],
        )

    def encode(self, prompt: str | list[dict], response: str | list[dict]) -> tuple[str, list[int]]:
        """Format (prompt, response) and truncate it exactly as training does (the same ids a pair of
        the training data gets). The text is the formatted string, or the kept tokens decoded when the
        pair was cut to max_length."""
        encoded = self.formatter.encode_items([(prompt, response)])[0]
        if isinstance(encoded, str):
            raise DataError(encoded)
        ids = truncate(encoded.ids, encoded.ids, encoded.n_prompt, self.formatter.n_protected, self.max_length)[0]
        return self._text(prompt, response, ids, cut=ids != encoded.ids), ids

    def encode_text(self, text: str) -> tuple[str, list[int]]:
        """An already formatted text (prompt and response), as PPO loops send it: padding removed,
        tokenized as is, the start cut (after BOS) when too long."""
        if self.tokenizer.pad_token:
            text = text.replace(self.tokenizer.pad_token, "")
        if len(text) > self.formatter.max_chars:  # only the end can be scored: tokenize no more than that
            bos = self.formatter.bos if text.startswith(self.formatter.bos) else ""
            text = bos + text[-self.formatter.max_chars :]
        ids = self.formatter.encode([text])[0]
        if len(ids) <= self.max_length:
            return text, ids
        n = self.formatter.n_protected  # no known prompt part: only the start after BOS is cut
        ids = truncate(ids, ids, n, n, self.max_length)[0]
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False), ids

    def _text(self, prompt: str | list[dict], response: str | list[dict], ids: list[int], cut: bool) -> str:
        if cut:
            return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return self.formatter.texts(prompt, response)[1]

    @torch.inference_mode()
    def score(
        self, sequences: list[list[int]], progress: Any = None, with_std: bool = False, with_attributes: bool = False
    ) -> np.ndarray:
        """Rewards `(N,)` of token id sequences, computed in batches of similar length, in input order;
        `with_std` (an ensemble's export): `(N, 2)`, each reward and the standard deviation of its heads;
        `with_attributes` (an attributes export): `(N, 1 + attributes)`, each reward and its predicted ratings.
        `progress` (a rich Progress) advances as batches finish."""
        if with_std and not self.has_std:
            raise ValueError("with_std: this export has one head, no spread to report")
        if with_attributes and not self.attributes:
            raise ValueError("with_attributes: this export has no attribute heads")
        heads = with_std or with_attributes  # read the carried heads beside the model's logit
        width = 1 + (len(self.attributes) if with_attributes else 1) if heads else 1
        rewards = np.zeros((len(sequences), width))
        order = np.argsort([-len(s) for s in sequences], kind="stable")
        task = progress.add_task("scoring", total=len(sequences)) if progress else None
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            input_ids, mask = pad_sequences([sequences[i] for i in chunk], self.tokenizer.pad_token_id)
            input_ids, mask = input_ids.to(self.model.device), mask.to(self.model.device)
            if heads:
                rewards[chunk] = self._with_heads(input_ids, mask)
            else:
                rewards[chunk, 0] = self.model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().cpu()
            if progress:
                progress.advance(task, len(chunk))
        return rewards if heads else rewards[:, 0]

    def _with_heads(self, input_ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        """`(N, 2)`: the model's reward, and the spread of the ensemble's heads on the state its reward
        module reads (every position for a native model, which then picks the last real token); for an
        attributes export `(N, 1 + attributes)`, the reward and the predicted ratings."""
        heads, module = self.heads
        seen: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0]))
        try:
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float()
        finally:
            handle.remove()
        state = seen[-1]
        if state.ndim == 3:
            state = state[torch.arange(len(state), device=state.device), last_token_index(mask)]
        outputs = heads(state.to(heads.weight.device))
        extra = heads.attributes(outputs) if self.attributes else heads.uncertainty(outputs)[:, None]
        return torch.cat([logits[:, None], extra.to(logits.device)], 1).cpu().numpy()

    def normalized(self, reward: float) -> float | None:
        return (reward - self.mean) / self.std if self.mean is not None and self.std else None
