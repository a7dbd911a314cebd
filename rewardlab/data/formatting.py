"""Formatting: the one place that turns (prompt, response) into token ids, for training, scoring,
serving and export alike. `sep`: `{BOS}prompt{SEP}response{EOS}`; `plain`: `{BOS}prompt response{EOS}`;
`chat`: the tokenizer's chat template. `truncate` fits a pair into `max_length`. No Lightning here.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from rewardlab.data.rows import DataError, common_prefix

log = logging.getLogger(__name__)

FORMATS = ("sep", "chat", "plain")
SPECIAL_TOKENS_IN_TEXT = ("text", "bad_row")


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Batches need a pad id; the reward never reads it (the attention mask says where text ends)."""
    if tokenizer.pad_token is not None:
        return
    fallback = tokenizer.eos_token or tokenizer.unk_token
    if fallback is None:
        raise DataError("the tokenizer has no pad, EOS or UNK token to pad with; add one to the tokenizer")
    tokenizer.pad_token = fallback
    log.info("tokenizer has no pad token: padding with %r (padding is masked, never scored)", fallback)


@dataclass
class Encoded:
    """The token ids of one formatted (prompt, response), before truncation, and how many of them
    are the prompt part (BOS, prompt, separator or the template's generation prompt)."""

    ids: list[int]
    n_prompt: int


class Formatter:
    """Renders (prompt, response) as text and tokenizes it exactly as it will be scored.

    `sep`: `{BOS}prompt{SEP}response{EOS}`; `plain`: `{BOS}prompt response{EOS}` with no separator
    added; `chat`: the chat template. `{BOS}` is whatever the tokenizer itself puts first ([CLS],
    <s>, ...); a tokenizer without EOS ends with the special token it appends (BERT's [SEP]).
    Texts are tokenized with `add_special_tokens=False`, so `text` -> ids is reproducible.

    User text never becomes a control token: a literal `[SEP]` or `<|im_end|>` inside a prompt or
    response is tokenized as the characters it is (`special_tokens_in_text="text"`), or makes the
    pair a bad row (`"bad_row"`). With `max_length`, a text far longer than any `max_length` tokens
    can cover is cut to the end that truncation keeps before it is tokenized, so one huge row costs
    memory in proportion to `max_length`, not to its size.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        style: str,
        chat_template: str | None = None,
        max_length: int | None = None,
        special_tokens_in_text: str = "text",
    ):
        if style not in FORMATS:
            raise DataError(f"data.format: unknown {style!r}; expected auto or one of {FORMATS}")
        if special_tokens_in_text not in SPECIAL_TOKENS_IN_TEXT:
            raise DataError(
                f"data.special_tokens_in_text: unknown {special_tokens_in_text!r}; "
                f"expected one of {', '.join(SPECIAL_TOKENS_IN_TEXT)}"
            )
        self.tokenizer, self.style, self.special_policy = tokenizer, style, special_tokens_in_text
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
        specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len)
        self.specials = re.compile("|".join(re.escape(t) for t in reversed(specials))) if specials else None
        longest_token = max(map(len, tokenizer.get_vocab()), default=1)
        self.max_chars = 2 * max_length * max(longest_token, 16) if max_length else None
        if max_length is not None:
            smallest = len(self.encode_items([("", "x")])[0].ids)
            if max_length < smallest:
                raise DataError(
                    f"data.max_length={max_length} leaves no room for a response: the format alone takes "
                    f"{smallest} tokens for an empty prompt and a one-character response; "
                    f"set data.max_length >= {smallest}"
                )

    def texts(self, prompt: str | list[dict], response: str | list[dict]) -> tuple[str, str]:
        """Return (prompt part, full text); the full text starts with the prompt part."""
        if self.style == "chat":
            messages, n = self._messages(prompt, response)
            head = self._render(messages[:n], generation_prompt=True)
            full = self._render(messages)
            return head[: common_prefix(head, full)], full
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise DataError(f"data.format={self.style} needs string data; conversational data needs format=chat")
        head = self.bos + prompt + (self.tokenizer.sep_token if self.style == "sep" else "")
        return head, head + response + self.eos

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of already formatted texts, as they are (their special tokens are the format's)."""
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def special_token_in(self, prompt: str | list[dict], response: str | list[dict]) -> str | None:
        """The first special token (e.g. `[SEP]`) written literally in the user's text, if any."""
        if self.specials is None:
            return None
        for part in (prompt, response):
            for text in [part] if isinstance(part, str) else [m["content"] for m in part]:
                if found := self.specials.search(text):
                    return found.group()
        return None

    def encode_items(self, items: list[tuple[str | list[dict], str | list[dict]]]) -> list[Encoded | str]:
        """Encode (prompt, response) items in one batch: an `Encoded` each, or, for an item this
        formatter refuses, the reason (a special token written in its text, with `bad_row`)."""
        items = [(self.cut(p), self.cut(r)) for p, r in items]
        out: list[Encoded | str | None] = [None] * len(items)
        plain: list[tuple[int, str, str]] = []
        for i, (prompt, response) in enumerate(items):
            head, full = self.texts(prompt, response)
            token = self.special_token_in(prompt, response) or self._formed_at_a_join(full, prompt, response)
            if token is None:
                plain.append((i, head, full))
            elif self.special_policy == "bad_row":
                out[i] = (
                    f"contains the tokenizer's special token {token!r} as text (data.special_tokens_in_text=bad_row)"
                )
            else:
                out[i] = self._encode_segments(prompt, response)
        ids = self.encode([full for *_, full in plain] + [head for _, head, _ in plain]) if plain else []
        for k, (i, *_) in enumerate(plain):
            out[i] = Encoded(ids[k], len(ids[len(plain) + k]))
        return out

    def _formed_at_a_join(self, full: str, prompt: str | list[dict], response: str | list[dict]) -> str | None:
        """A special token that the user's text forms only together with its neighbour (`plain` joins
        `...[SE` and `P]...` into `[SEP]`): more special tokens in the text than the format puts there."""
        if self.specials is None:
            return None
        found = self.specials.findall(full)
        if self.style == "chat":
            messages, n = self._messages(prompt, response)
            neutral = [{**m, "content": "x"} for m in messages]
            expected = len(self.specials.findall(self.texts(neutral[:n], neutral[n:])[1]))
        else:
            expected = len(self.specials.findall(self.texts("x", "x")[1]))
        return found[-1] if len(found) != expected else None

    def cut(self, part: str | list[dict]) -> str | list[dict]:
        """A text longer than `max_chars` keeps its last `max_chars` characters: more than `max_length`
        tokens' worth, and the end is what truncation keeps (of a prompt and of a response alike). A
        message list keeps its last messages within the same budget (each counts at least 16 characters
        for its template markup), the earliest of them cut to fit."""
        if self.max_chars is None:
            return part
        if isinstance(part, str):
            return part[-self.max_chars :]
        kept, room = [], self.max_chars
        for message in reversed(part):
            if room <= 0:
                break
            content = message["content"]
            kept.append(message if len(content) <= room else {**message, "content": content[-room:]})
            room -= len(content) + 16
        return kept[::-1]

    def _messages(self, prompt: str | list[dict], response: str | list[dict]) -> tuple[list[dict], int]:
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        response = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
        return prompt + response, len(prompt)

    def _render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _segments(self, prompt: str | list[dict], response: str | list[dict]) -> list[tuple[str, bool]]:
        """The full text as (piece, is user text) pieces. For a chat template the messages' places are
        found by rendering placeholders; a template that alters message text cannot be split."""
        if self.style != "chat":
            head, _ = self.texts(prompt, response)
            sep = head[len(self.bos) + len(prompt) :]
            return [(self.bos, False), (prompt, True), (sep, False), (response, True), (self.eos, False)]
        messages, _ = self._messages(prompt, response)
        placeholders = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        parts = re.split("\ue000(\\d+)\ue001", self._render(placeholders))
        pieces = [(messages[int(p)]["content"], True) if k % 2 else (p, False) for k, p in enumerate(parts)]
        if "".join(p for p, _ in pieces) != self._render(messages):
            raise DataError(
                "this chat template changes message text, so special tokens written in the text cannot be "
                "kept as text; remove them or set data.special_tokens_in_text=bad_row"
            )
        return pieces

    def _encode_segments(self, prompt: str | list[dict], response: str | list[dict]) -> Encoded:
        """Tokenize the format's own pieces as usual and the user's text with special tokens split
        into ordinary characters; the prompt part is the pieces that fall within the head text."""
        head_chars = len(self.texts(prompt, response)[0])
        ids: list[int] = []
        n_prompt, at = 0, 0
        for piece, is_text in self._segments(prompt, response):
            tokens = self._tokenize_piece(piece, is_text)
            if at + len(piece) <= head_chars:
                n_prompt += len(tokens)
            elif at < head_chars:
                n_prompt += len(self._tokenize_piece(piece[: head_chars - at], is_text))
            ids += tokens
            at += len(piece)
        return Encoded(ids, n_prompt)

    def _tokenize_piece(self, piece: str, is_text: bool) -> list[int]:
        if not piece:
            return []
        return self.tokenizer(piece, add_special_tokens=False, split_special_tokens=is_text, verbose=False)["input_ids"]


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
