"""Secrets: every value that looks secret, by its variable's name, its own shape or its key, is masked."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewardlab.redaction import MASK, environment_secrets, redact, redacted_argv

SECRET_NAMES = st.sampled_from(
    ["HF_TOKEN", "MY_SERVICE_KEY", "DB_PASSWORD", "SSH_PRIVATE", "AWS_SECRET_ACCESS_KEY", "OPENAI_API_KEY",
     "GITHUB_PAT", "KEY", "X_CREDENTIALS", "PGPASSWORD", "app_secret", "Bearer_Auth"]
)  # fmt: skip
VALUES = st.text(st.sampled_from("abcdefXYZ0123456789-_."), min_size=4, max_size=40).filter(
    lambda v: v.strip("-_.") and v.lower() not in {"true", "false", "none", "null"}
)


@settings(max_examples=100, deadline=None)
@given(name=SECRET_NAMES, value=VALUES)
def test_any_value_of_a_secret_named_variable_is_masked_wherever_it_stands(name, value):
    config = {"a": f"url://{value}/x", "b": [value, {"c": f"{value} and more"}], "d": 3}
    with pytest.MonkeyPatch.context() as env:
        env.setenv(name, value)
        text = str(redact(config))
    assert value not in text.replace(MASK, " ")


@pytest.mark.parametrize(
    "value",
    [
        "hf_abcdefghijklmnopqrstuvwxyz",
        "sk-proj-abcdefghijklmnop1234",
        "ghp_abcdefghijklmnopqrstuvwxyz012345",
        "AKIAABCDEFGHIJKLMNOP",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        "https://alice:s3cr3tpass@example.com/repo.git",
    ],
)
def test_values_that_look_like_credentials_are_masked_whatever_their_variable(value, monkeypatch):
    monkeypatch.setenv("INNOCENT_LOOKING", value)
    assert value in environment_secrets() or "://" in value
    assert "s3cr3t" not in redact(f"x {value} y") and redact(f"x {value} y").count(MASK) >= 1


def test_short_values_are_masked_only_where_they_stand_alone(monkeypatch):
    monkeypatch.setenv("MY_KEY", "abc1")
    assert redact(["abc1", "k=abc1", "xabc1y", "abc12"]) == [MASK, f"k={MASK}", "xabc1y", "abc12"]
    monkeypatch.setenv("FEATURE_KEY", "1")  # a flag, not a secret: never masks every "1"
    assert redact("trainer.devices=1") == "trainer.devices=1"


def test_config_keys_and_overrides_that_name_a_secret_are_masked():
    config = {"backbone": {"token": "abcd", "tokenizer_name_or_path": "gpt2"}, "data": {"max_tokens": 5}}
    assert redact(config) == {"backbone": {"token": MASK, "tokenizer_name_or_path": "gpt2"}, "data": {"max_tokens": 5}}
    overrides = ["+db.password=hunter2", "++hf_token=xyz", "seed=3", "data.special_tokens_in_text=text"]
    assert redact(overrides) == ["+db.password=***", "++hf_token=***", "seed=3", "data.special_tokens_in_text=text"]


def test_variables_that_are_not_secret_stay(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("KEYBOARD_LAYOUT", "qwertz-layout")
    monkeypatch.setenv("MONKEY_NAME", "george-the-monkey")
    assert redact("qwertz-layout george-the-monkey false") == "qwertz-layout george-the-monkey false"


def test_the_command_line_is_masked_while_a_library_reads_it(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_zzzzzzzzzzzzzzzzzzzzzzzz")
    monkeypatch.setattr(sys, "argv", ["train", "+x=hf_zzzzzzzzzzzzzzzzzzzzzzzz", "+db.password=pw"])
    with redacted_argv():
        assert sys.argv == ["train", f"+x={MASK}", f"+db.password={MASK}"]
    assert sys.argv[1] == "+x=hf_zzzzzzzzzzzzzzzzzzzzzzzz"


def test_the_working_directory_and_paths_are_not_secrets(monkeypatch, tmp_path):
    monkeypatch.setenv("PWD", str(tmp_path))
    monkeypatch.setenv("OLDPWD", "/home/someone")
    monkeypatch.setenv("DB_PWD", "hunter22")
    assert redact(f"{tmp_path}/data.jsonl /home/someone hunter22") == f"{tmp_path}/data.jsonl /home/someone ***"


def test_whatever_a_secret_named_key_holds_is_masked(monkeypatch):
    monkeypatch.setenv("DB_PIN_SECRET", "87654321")
    config = {
        "db": {"password": ["hunter2hunter2"], "pin": 87654321},
        "svc": {"api_key": 55554444, "api-key": "k", "secret_key": "wJalrXUtnFEMI"},
        "serve": {"token": 83920571, "pass": {"a": 1}},
        "other": 87654321,  # the value of a secret variable, as a number
        "trust_remote_code": False,
    }
    text = str(redact(config))
    for leaked in ("hunter2hunter2", "87654321", "55554444", "wJalrXUtnFEMI", "83920571", "'a'"):
        assert leaked not in text, leaked
    assert "'trust_remote_code': False" in text


def test_secrets_inside_overrides_and_their_joined_forms_are_masked():
    overrides = ["+db={password:hunter2hunter2}", "+db.password=[hunter2hunter2]", "+s3.secret_key=wJalr"]
    masked = redact(overrides)
    assert not any(s in str(masked) for s in ("hunter2hunter2", "wJalr"))
    joined = "db={password:hunter2hunter2},seed=3,x.db_token=abc123"  # Hydra's override_dirname, wandb tags
    assert redact(joined) == "db={password:***},seed=3,x.db_token=***"
    assert redact("special_tokens_in_text=text,max_tokens=5") == "special_tokens_in_text=text,max_tokens=5"
