"""Formatting: the one place that turns (prompt, response) into token ids, for training, scoring,
serving and export alike. `sep`: `{BOS}prompt{SEP}response{EOS}`; `plain`: `{BOS}prompt response{EOS}`;
`chat`: the tokenizer's chat template. `truncate` fits a pair into `max_length`. No Lightning here.
"""

from __future__ import annotations

import logging

from transformers import PreTrainedTokenizerBase

from rewardlab.data.rows import DataError, common_prefix

log = logging.getLogger(__name__)

FORMATS = ("sep", "chat", "plain")


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Batches need a pad id; the reward never reads it (the attention mask says where text ends)."""
    if tokenizer.pad_token is not None:
        return
    fallback = tokenizer.eos_token or tokenizer.unk_token
    if fallback is None:
        raise DataError("the tokenizer has no pad, EOS or UNK token to pad with; add one to the tokenizer")
    tokenizer.pad_token = fallback
    log.info("tokenizer has no pad token: padding with %r (padding is masked, never scored)", fallback)


class Formatter:
    """Renders (prompt, response) as text and tokenizes it exactly as it will be scored.

    `sep`: `{BOS}prompt{SEP}response{EOS}`; `plain`: `{BOS}prompt response{EOS}` with no separator
    added; `chat`: the chat template. `{BOS}` is whatever the tokenizer itself puts first ([CLS],
    <s>, ...); a tokenizer without EOS ends with the special token it appends (BERT's [SEP]).
    Texts are tokenized with `add_special_tokens=False`, so `text` -> ids is reproducible.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, style: str, chat_template: str | None = None):
        if style not in FORMATS:
            raise DataError(f"data.format: unknown {style!r}; expected auto or one of {FORMATS}")
        self.tokenizer, self.style = tokenizer, style
        self.chat_template = chat_template or tokenizer.chat_template
        with_specials = tokenizer("x")["input_ids"]
        bare = tokenizer("x", add_special_tokens=False)["input_ids"]
        start = next((i for i in range(len(with_specials)) if with_specials[i : i + len(bare)] == bare), 0)
        special = set(tokenizer.all_special_ids)
        prefix = [t for t in with_specials[:start] if t in special]
        suffix = [t for t in with_specials[start + len(bare) :] if t in special]
        self.bos = "".join(tokenizer.convert_ids_to_tokens(prefix))
        self.n_protected = len(prefix)
        self.eos = tokenizer.eos_token or "".join(tokenizer.convert_ids_to_tokens(suffix[-1:]))
        if style == "sep" and tokenizer.sep_token is None:
            raise DataError("data.format=sep: the tokenizer has no separator token; use chat or plain")
        if style == "chat" and not self.chat_template:
            raise DataError("data.format=chat: the tokenizer has no chat template; set data.chat_template")
        if style != "chat" and not self.eos:
            raise DataError(f"data.format={style}: the tokenizer has no EOS token and appends none")

    def texts(self, prompt: str | list[dict], response: str | list[dict]) -> tuple[str, str]:
        """Return (prompt part, full text); the full text starts with the prompt part."""
        if self.style == "chat":
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            response = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
            render = self.tokenizer.apply_chat_template
            head = render(prompt, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True)
            full = render(prompt + response, chat_template=self.chat_template, tokenize=False)
            return head[: common_prefix(head, full)], full
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise DataError(f"data.format={self.style} needs string data; conversational data needs format=chat")
        head = self.bos + prompt + (self.tokenizer.sep_token if self.style == "sep" else "")
        return head, head + response + self.eos

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids in full; `truncate` cuts them to max_length (so no "longer than" warning here)."""
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def resolve_format(style: str, schema: str, tokenizer: PreTrainedTokenizerBase, chat_template: str | None) -> str:
    """auto: the chat template for conversational data; else `prompt [SEP] response [EOS]` where the
    tokenizer has a separator, the chat template where it has one, plain text otherwise."""
    if style != "auto":
        return style
    if schema == "conversational" or (tokenizer.sep_token is None and (chat_template or tokenizer.chat_template)):
        return "chat"
    return "sep" if tokenizer.sep_token is not None else "plain"


def truncate(
    chosen: list[int], rejected: list[int], n_prompt: int, n_protected: int, max_length: int
) -> tuple[list[int], list[int], str, int]:
    """Fit both sides into `max_length`: cut the shared prompt from the left first (by the same
    amount on both sides, keeping the leading BOS/CLS), then the start of a response that is still
    too long, so every response keeps its end and EOS. Returns both sides, the kind of cut ('',
    'prompt' or 'response') and how many prompt tokens are left."""
    over = max(len(chosen), len(rejected)) - max_length
    if over <= 0:
        return chosen, rejected, "", n_prompt
    cut = min(over, max(n_prompt - n_protected, 0))
    head = slice(0, n_protected)
    sides = [s[head] + s[n_protected + cut :] for s in (chosen, rejected)]
    kind = "prompt"
    kept = max(n_prompt - cut, n_protected)
    for i, s in enumerate(sides):
        if len(s) > max_length:
            sides[i] = s[:kept] + s[kept + len(s) - max_length :]
            kind = "response"
    return sides[0], sides[1], kind, kept
