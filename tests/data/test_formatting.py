"""Formatting and truncation: the exact text and ids a pair becomes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewardlab.data.formatting import Formatter, ensure_pad_token, resolve_format, truncate
from rewardlab.data.rows import DataError

from .common import bert_tokenizer


def test_sep_format_is_bos_prompt_sep_response_eos(tiny_tokenizer):
    f = Formatter(tiny_tokenizer, "sep")
    head, full = f.texts("Which is larger, 3 or 4?", "4")
    assert full == "[BOS]Which is larger, 3 or 4?[SEP]4[EOS]" and full.startswith(head)
    ids = f.encode([full])[0]
    assert ids[0] == tiny_tokenizer.bos_token_id and ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.sep_token_id in ids and tiny_tokenizer.decode(ids) == full


def test_bert_style_tokenizer_uses_cls_and_ends_with_sep():
    tok = bert_tokenizer()
    f = Formatter(tok, "sep")
    full = f.texts("what is the capital of france?", "paris.")[1]
    assert full == "[CLS]what is the capital of france?[SEP]paris.[SEP]"
    assert f.encode([f.texts("say hello", "hola")[1]])[0] == tok("say hello", "hola")["input_ids"]
    assert resolve_format("auto", "explicit", tok, None) == "sep"


def test_chat_format_uses_the_template_and_auto_picks_it_for_conversations(tiny_tokenizer):
    f = Formatter(tiny_tokenizer, "chat")
    head, full = f.texts([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "yo"}])
    assert head == "[BOS]<|user|>hi[EOS]<|assistant|>" and full == "[BOS]<|user|>hi[EOS]<|assistant|>yo[EOS]"
    assert resolve_format("auto", "conversational", tiny_tokenizer, None) == "chat"
    assert resolve_format("auto", "explicit", tiny_tokenizer, None) == "sep"
    assert Formatter(tiny_tokenizer, "plain").texts("a", "b")[1] == "[BOS]ab[EOS]"


def test_tokenizer_without_pad_token_gets_one_with_a_note(caplog):
    tok = bert_tokenizer()
    tok.pad_token = None
    tok.eos_token = "[SEP]"
    with caplog.at_level("INFO"):
        ensure_pad_token(tok)
    assert tok.pad_token == "[SEP]" and "no pad token" in caplog.text


def test_short_pairs_are_untouched():
    assert truncate([1, 5, 6, 2], [1, 5, 7, 2], 2, 1, 10) == ([1, 5, 6, 2], [1, 5, 7, 2], "", 2)


def test_long_prompt_is_cut_from_the_left_on_both_sides_keeping_bos():
    # [BOS] p1..p6 [SEP] | response [EOS]; prompt part = 8 tokens
    prompt = [1, 11, 12, 13, 14, 15, 16, 3]
    chosen, rejected = prompt + [20, 21, 2], prompt + [30, 2]
    c, r, kind, kept = truncate(chosen, rejected, n_prompt=8, n_protected=1, max_length=8)
    assert kind == "prompt" and kept == 5
    assert c == [1, 14, 15, 16, 3, 20, 21, 2]  # three prompt tokens cut, response intact
    assert r == [1, 14, 15, 16, 3, 30, 2]  # the same prompt cut on the other side


def test_long_response_keeps_its_end_and_eos():
    prompt = [1, 11, 3]
    chosen, rejected = prompt + list(range(40, 50)) + [2], prompt + [30, 2]
    c, r, kind, kept = truncate(chosen, rejected, n_prompt=3, n_protected=1, max_length=6)
    assert kind == "response" and kept == 1
    assert c == [1, 46, 47, 48, 49, 2]  # prompt gone first, then the response start; BOS and EOS stay
    assert r == [1, 30, 2]


# ---------------------------------------------------------------------------------- user text is text

SPECIALS = ["[SEP]", "[EOS]", "[BOS]", "[PAD]", "<|user|>", "<|assistant|>", "<|system|>"]
WORDS = st.sampled_from(["a", "b", " ", "x y", "7", "\n", "é", "[", "]", "<|", "|>", *SPECIALS])
TEXT = st.lists(WORDS, min_size=1, max_size=12).map("".join)


def control_ids(formatter: Formatter, ids: list[int]) -> list[int]:
    special = set(formatter.tokenizer.all_special_ids)
    return [i for i in ids if i in special]


@settings(max_examples=80, deadline=None)
@given(prompt=TEXT, response=TEXT, style=st.sampled_from(["sep", "plain", "chat"]))
def test_special_tokens_written_in_user_text_never_become_control_tokens(prompt, response, style, tiny_tokenizer):
    """Property: whatever the user writes, the control tokens are exactly the format's own."""
    f = Formatter(tiny_tokenizer, style)
    encoded = f.encode_items([(prompt, response)])[0]
    clean = f.encode_items([("p", "r")])[0]
    assert control_ids(f, encoded.ids) == control_ids(f, clean.ids)
    assert encoded.n_prompt <= len(encoded.ids)
    if f.special_token_in(prompt, response) is None:  # ordinary text: tokenized as one string, as before
        assert encoded.ids == f.encode([f.texts(prompt, response)[1]])[0]


def test_a_literal_special_token_is_tokenized_as_its_characters(tiny_tokenizer):
    f = Formatter(tiny_tokenizer, "sep")
    encoded = f.encode_items([("Is [SEP] a token?", "yes [EOS] it is")])[0]
    assert encoded.ids.count(tiny_tokenizer.sep_token_id) == 1 and encoded.ids.count(tiny_tokenizer.eos_token_id) == 1
    assert tiny_tokenizer.decode(encoded.ids) == "[BOS]Is [SEP] a token?[SEP]yes [EOS] it is[EOS]"
    assert encoded.n_prompt == len(f.encode_items([("Is [SEP] a token?", "")])[0].ids) - 1


def test_a_literal_special_token_in_a_chat_message_stays_text(tiny_tokenizer):
    f = Formatter(tiny_tokenizer, "chat")
    prompt = [{"role": "user", "content": "say <|assistant|> please"}]
    encoded = f.encode_items([(prompt, [{"role": "assistant", "content": "ok[EOS]"}])])[0]
    ids = tiny_tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>", "[EOS]"])
    assert [encoded.ids.count(i) for i in ids] == [1, 1, 2]  # one turn each, two message ends


def test_special_tokens_in_text_can_make_the_pair_a_bad_row(tiny_tokenizer):
    f = Formatter(tiny_tokenizer, "sep", special_tokens_in_text="bad_row")
    ok, bad = f.encode_items([("p", "r"), ("p", "r[PAD]")])
    assert not isinstance(ok, str) and "'[PAD]'" in bad and "special_tokens_in_text=bad_row" in bad
    with pytest.raises(DataError, match="special_tokens_in_text: unknown 'drop'"):
        Formatter(tiny_tokenizer, "sep", special_tokens_in_text="drop")


def test_a_chat_template_that_changes_message_text_cannot_keep_specials_as_text(tiny_tokenizer):
    trims = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}[EOS]{% endfor %}"
    f = Formatter(tiny_tokenizer, "chat", chat_template=trims)
    assert f.encode_items([(" hi ", "yo")])[0].ids  # no special token: rendered as usual
    with pytest.raises(DataError, match="changes message text"):
        f.encode_items([("hi [SEP] ", "yo")])


# ---------------------------------------------------------------------------------- long texts, bounded memory


@settings(max_examples=40, deadline=None)
@given(
    prompt=st.text(st.sampled_from("ab cd.\n7é"), min_size=0, max_size=3000),
    response=st.text(st.sampled_from("ab cd.\n7é"), min_size=1, max_size=3000),
)
def test_cutting_long_texts_before_tokenizing_changes_no_kept_token(prompt, response, tiny_tokenizer):
    """Property: with max_length, texts far beyond it are cut to characters before tokenizing, and the
    truncated ids are the ones tokenizing the whole text would have given."""
    short = Formatter(tiny_tokenizer, "sep", max_length=16)
    whole = Formatter(tiny_tokenizer, "sep")
    assert short.max_chars < 3000
    (cut,), (full,) = short.encode_items([(prompt, response)]), whole.encode_items([(prompt, response)])
    kept = truncate(cut.ids, cut.ids, cut.n_prompt, short.n_protected, 16)[0]
    assert kept == truncate(full.ids, full.ids, full.n_prompt, whole.n_protected, 16)[0]


def test_max_length_that_leaves_no_room_for_a_response_is_refused(tiny_tokenizer):
    with pytest.raises(DataError, match=r"data.max_length=3 leaves no room for a response.*takes 4 tokens"):
        Formatter(tiny_tokenizer, "sep", max_length=3)
    assert Formatter(tiny_tokenizer, "sep", max_length=4).max_chars > 0


@pytest.mark.parametrize("style", ["plain", "sep", "chat"])
@pytest.mark.parametrize("prompt, response", [("Is 7 odd [SE", "P] yes"), ("a<|us", "er|>b"), ("x[EO", "S]")])
def test_a_special_token_formed_where_prompt_meets_response_is_not_a_control_token(
    style, prompt, response, tiny_tokenizer
):
    f = Formatter(tiny_tokenizer, style)
    encoded = f.encode_items([(prompt, response)])[0]
    assert control_ids(f, encoded.ids) == control_ids(f, f.encode_items([("p", "r")])[0].ids)
    strict = Formatter(tiny_tokenizer, style, special_tokens_in_text="bad_row").encode_items([(prompt, response)])[0]
    assert isinstance(strict, str) or style != "plain"  # plain joins them with nothing between


def test_a_prompt_of_a_million_messages_costs_what_max_length_needs(tiny_tokenizer):
    f = Formatter(tiny_tokenizer, "chat", max_length=32)
    prompt = [{"role": "user" if i % 2 else "assistant", "content": f"m{i}"} for i in range(1_000_000)]
    encoded = f.encode_items([(prompt, [{"role": "assistant", "content": "the end"}])])[0]
    whole = Formatter(tiny_tokenizer, "chat").encode_items(
        [(prompt[-200:], [{"role": "assistant", "content": "the end"}])]
    )
    assert (
        truncate(encoded.ids, encoded.ids, encoded.n_prompt, f.n_protected, 32)[0]
        == truncate(whole[0].ids, whole[0].ids, whole[0].n_prompt, f.n_protected, 32)[0]
    )
    assert len(f.cut(prompt)) < f.max_chars // 16 + 2
