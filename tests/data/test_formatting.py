"""Formatting and truncation: the exact text and ids a pair becomes."""

from __future__ import annotations

from rewardlab.data.formatting import Formatter, ensure_pad_token, resolve_format, truncate

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
