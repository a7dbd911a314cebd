"""The reward server: OpenRLHF's protocol, and no client can hurt another (bad items, bad bodies,
stalled connections, load with hostile clients mixed in)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from rewardlab.export import export
from rewardlab.scoring import Scorer
from rewardlab.serve import Batcher, RequestError, auth_token, serving
from rewardlab.train import train

from .conftest import ROOT, compose_config

LIMITS = {"max_texts": 8, "max_text_chars": 3000, "max_body_bytes": 250_000, "read_timeout_s": 2}
SERVER = [f"{k}={v}" for k, v in LIMITS.items()] + ["keep_alive_s=1", "max_wait_ms=20", "backlog=1024"]
QUIZ = ROOT / "rewardlab" / "assets" / "quiz"
HEAD = b"POST /get_reward HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"


def honest(i: int) -> str:
    return f"[BOS]Is {i} even or odd?[SEP]{('odd', 'even')[i % 2]}[EOS]"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A tiny decoder trained for a few steps on a slice of the quiz data, exported."""
    run = tmp_path_factory.mktemp("run")
    for split in ("train", "val"):
        (run / f"{split}.jsonl").write_text("".join((QUIZ / f"{split}.jsonl").read_text().splitlines(True)[:64]))
    data = [f"data.train_file={run}/train.jsonl", f"data.val_file={run}/val.jsonl", "data.test_file=null"]
    overrides = ["logger=none", "trainer.max_steps=4", "~callbacks.progress_bar", *data]
    train(compose_config("train", overrides, run / "out", cache_dir))
    ckpt, folder = run / "out" / "checkpoints" / "last.ckpt", run / "rm"
    export(compose_config("export", [f"ckpt_path={ckpt}", f"output_dir={folder}"], run / "x", cache_dir))
    return folder


@pytest.fixture(scope="module")
def serve_cfg(export_dir: Path, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path):
    def _make(*overrides: str):
        out = tmp_path_factory.mktemp("serve")
        return compose_config("serve", [f"model_dir={export_dir}", "port=0", *SERVER, *overrides], out, cache_dir)

    return _make


@pytest.fixture(scope="module")
def url(serve_cfg) -> str:
    with serving(serve_cfg()) as base:
        yield base


@pytest.fixture(scope="module")
def alone(export_dir: Path):
    """Reward of one text (or one (prompt, response) pair) scored by itself, outside the server."""
    scorer, cache = Scorer(str(export_dir), False, 1), {}

    def reward(item: str | tuple[str, str]) -> float:
        if item not in cache:
            ids = scorer.encode_text(item)[1] if isinstance(item, str) else scorer.encode(*item)[1]
            cache[item] = float(scorer.score([ids])[0])
        return cache[item]

    return reward


def post(url: str, payload: Any, headers: dict[str, str] | None = None, path: str = "/get_reward") -> tuple[int, Any]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    try:
        conn.request("POST" if payload is not None else "GET", path, data, headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def raw(url: str, data: bytes, pause: float = 0.0, at_once: int = 0) -> tuple[bytes, float]:
    """Send `data` on a fresh connection (after the first `at_once` bytes one byte every `pause` s, when
    pause > 0) and read until the server closes it; returns what came back and when the connection ended."""
    start, out = time.monotonic(), b""
    pieces = [data[:at_once]] + [data[i : i + 1] for i in range(at_once, len(data))] if pause else [data]
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30) as s:
        try:
            for piece in pieces:
                s.sendall(piece)
                time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
    return out, time.monotonic() - start


def status(response: bytes) -> int | None:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", response)
    return int(match.group(1)) if match else None


def with_length(body: bytes) -> bytes:
    return HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body


def test_speaks_openrlhf_protocol_with_rewards_as_if_scored_alone(url, alone):
    assert url.startswith("http://127.0.0.1:")
    texts = [honest(7), honest(8), honest(7) + "[PAD][PAD]"]  # PPO pads; padding is not scored
    expected = [alone(honest(7)), alone(honest(8)), alone(honest(7))]
    for payload in ({"query": texts}, {"query": texts, "prompts": ["p"] * 3, "labels": None}):  # newer OpenRLHF
        code, body = post(url, payload)
        assert code == 200 and np.allclose(body["rewards"], expected, atol=1e-4)
    code, body = post(url, {"prompts": ["Is 7 even or odd?", ""], "responses": ["even", "odd"]})
    assert code == 200 and np.allclose(body["rewards"], [alone(honest(7)), alone(("", "odd"))], atol=1e-4)
    assert post(url, {"query": []}) == (200, {"rewards": []})
    assert post(url, None, path="/health") == (200, {"status": "ok"})
    assert post(url, {"query": []}, path="/elsewhere")[0] == 404
    code, answer = post(url, None, path="/get_reward")
    assert code == 405 and "POST /get_reward" in answer["error"]


BAD_ITEMS = [
    ("", "empty"),
    ("  \n\t ", "whitespace"),
    ("[PAD][PAD]", "special tokens"),
    ("[BOS][SEP][EOS]", "special tokens"),
    ("[BOS] [SEP]\n[PAD] [EOS]", "special tokens"),
    ("\ud800", "surrogate"),
    ("odd\udfffodd", "surrogate"),
    ("a\x00b", "NUL"),
    (7, "string"),
    (None, "string"),
    (1.5, "string"),
    (True, "string"),
    (["odd"], "string"),
    ({"content": "odd"}, "string"),
]


@pytest.mark.parametrize(("item", "problem"), BAD_ITEMS, ids=[repr(i) for i, _ in BAD_ITEMS])
def test_a_bad_query_item_is_a_400_naming_its_index_and_problem(url, item, problem):
    code, body = post(url, {"query": [honest(1), honest(2), item, honest(3)]})
    assert code == 400 and "query[2]" in body["error"] and problem in body["error"], body
    assert "query[0]" not in body["error"] and "query[3]" not in body["error"]


@pytest.mark.parametrize(
    ("payload", "where", "problem"),
    [
        ({"prompts": ["a", "b", "c"], "responses": ["x", "y", ""]}, "responses[2]", "empty"),
        ({"prompts": ["a", "b", "c"], "responses": ["x", "y", " \n"]}, "responses[2]", "whitespace"),
        ({"prompts": ["a", "b", "c"], "responses": ["x", "y", "\u2028\u3000"]}, "responses[2]", "whitespace"),
        ({"prompts": ["a", "b", "c"], "responses": ["x", "y", 3]}, "responses[2]", "string"),
        ({"prompts": ["a", "b", 3], "responses": ["x", "y", "z"]}, "prompts[2]", "string"),
        ({"prompts": ["a", "b", "\ud800"], "responses": ["x", "y", "z"]}, "prompts[2]", "surrogate"),
        ({"prompts": ["a", "b", "c"], "responses": ["x", "y", "z\x00"]}, "responses[2]", "NUL"),
        ({"prompts": ["a", "b", "c"], "responses": ["x", "y"]}, "responses", "3 items"),
        ({"prompts": ["a"]}, "responses", "required"),
    ],
)
def test_pairs_are_refused_where_training_refuses_them(url, payload, where, problem):
    code, body = post(url, payload)
    assert code == 400 and where in body["error"] and problem in body["error"], body


MALFORMED = {
    "syntax": b'{"query": ["odd"',
    "trailing garbage": b'{"query": []} x',
    "deep array": b"[" * 100_000 + b"]" * 100_000,
    "deep in query": b'{"query": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "huge integer": b'{"query": [' + b"1" + b"0" * 10_000 + b"]}",
    "huge exponent": b'{"query": [1e999999]}',
    "NaN": b'{"query": [NaN]}',
    "lone surrogate escape": b'{"query": ["\\ud800"]}',
    "reversed surrogates": b'{"query": ["\\udc00\\ud800"]}',
    "broken escape": b'{"query": ["\\u12"]}',
    "not UTF-8": b'{"query": ["\xc3\x28"]}',
    "latin-1": '{"query": ["caf\u00e9"]}'.encode("latin-1"),
    "UTF-16": '{"query": ["odd"]}'.encode("utf-16"),
    "array": b'["odd"]',
    "string": b'"odd"',
    "number": b"12",
    "null": b"null",
    "empty": b"",
    "object without fields": b'{"text": ["odd"]}',
    "object with null fields": b'{"query": null}',
    "duplicate keys": b'{"query": ["odd"], "query": 5}',
    "query not a list": b'{"query": "odd"}',
    "query an object": b'{"query": {"0": "odd"}}',
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_body_is_a_400_with_a_message(url, body):
    code, answer = post(url, body)
    assert code == 400 and isinstance(answer["error"], str) and answer["error"], answer


def test_limits_are_413_and_the_edges_pass(url):
    assert post(url, {"query": [honest(1)] * 8})[0] == 200
    assert post(url, {"query": [honest(1)] * 9})[0] == 413
    assert post(url, {"query": ["[BOS]" + "x" * 2995]})[0] == 200  # 3000 characters, truncated like training
    code, body = post(url, {"query": [honest(1), "x" * 3001]})
    assert code == 413 and "query[1]" in body["error"]
    assert post(url, {"prompts": ["p"], "responses": ["x" * 3001]})[0] == 413
    assert post(url, {"query": [honest(1)], "pad": " " * 250_000})[0] == 413


def test_body_size_is_counted_on_the_bytes_read_whatever_the_framing_says(url):
    good = json.dumps({"query": [honest(1)]}).encode()
    big = json.dumps({"query": [honest(1)], "pad": " " * 260_000}).encode()

    def chunked(body: bytes, size: int = 4096) -> bytes:
        pieces = [body[i : i + size] for i in range(0, len(body), size)]
        return HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)

    assert status(raw(url, chunked(good) + b"0\r\n\r\n")[0]) == 200  # chunked is fine within the limit
    assert status(raw(url, chunked(big) + b"0\r\n\r\n")[0]) == 413  # and cut off past it
    response, seconds = raw(url, HEAD + b"Content-Length: 99999999999\r\n\r\n")  # claims too much: not waited for
    assert status(response) == 413 and seconds < 1
    assert status(raw(url, HEAD + b"Content-Length: 10\r\n\r\n" + good)[0]) == 400  # claims less: the rest is not read
    response, seconds = raw(url, HEAD + b"Content-Length: 5000\r\n\r\n" + good)  # claims more, then stalls
    assert status(response) == 408 and 1.5 < seconds < 5
    assert status(raw(url, HEAD + b"\r\n" + good)[0]) == 411  # no length at all
    for length in (b"-5", b"abc", b"0x20", b"1e3", b"5, 5", b""):
        assert status(raw(url, HEAD + b"Content-Length: " + length + b"\r\n\r\n" + good)[0]) == 400, length
    assert status(raw(url, HEAD + b"Content-Length: 3\r\nContent-Length: 50\r\n\r\n" + good)[0]) == 400
    assert status(raw(url, b"\x16\x03\x01\x02\x00garbage\r\n\r\n")[0]) == 400
    assert post(url, {"query": [honest(2)]})[0] == 200


def test_stalled_clients_are_cut_off_without_holding_up_others(url):
    good = json.dumps({"query": [honest(1)]}).encode()
    head = HEAD + b"Content-Length: %d\r\n\r\n" % len(good)
    slow = {"silent": (b"", 0), "head byte by byte": (head + good, 0), "body byte by byte": (head + good, len(head))}
    with ThreadPoolExecutor(30) as pool:
        stalled = {name: [pool.submit(raw, url, data, 0.05, n) for _ in range(8)] for name, (data, n) in slow.items()}
        time.sleep(0.3)
        start = time.monotonic()
        assert all(post(url, {"query": [honest(i)]})[0] == 200 for i in range(10))
        assert time.monotonic() - start < 1.5  # not queued behind the stalled ones (cut off at 2 s)
        for name, futures in stalled.items():
            for response, seconds in (f.result() for f in futures):
                assert seconds < LIMITS["read_timeout_s"] + 1.5, (name, seconds)
                assert status(response) in ({None} if name != "body byte by byte" else {None, 408}), (name, response)


def test_hostile_items_never_fail_the_honest_requests_they_share_a_batch_with(url, alone):
    """The old server answered 49 of these 50 honest requests with 500."""
    jobs = [{"query": [""]}] * 64 + [{"query": [honest(i)]} for i in range(50)]
    random.Random(0).shuffle(jobs)
    barrier = threading.Barrier(len(jobs))

    def send(payload: dict) -> tuple[int, Any]:
        barrier.wait()
        return post(url, payload)

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(send, jobs))
    for payload, (code, body) in zip(jobs, answers):
        if payload["query"][0]:
            assert code == 200 and body["rewards"][0] == pytest.approx(alone(payload["query"][0]), abs=1e-4)
        else:
            assert code == 400 and "query[0]" in body["error"]


def test_a_batch_that_fails_anyway_is_scored_request_by_request():
    calls = []

    def score(sequences: list[list[int]]) -> np.ndarray:
        calls.append(sequences)
        if [-1] in sequences:
            raise RuntimeError("poisoned")
        return np.array([float(sum(s)) for s in sequences])

    async def scenario() -> list:
        batcher = Batcher(score, max_batch=64, max_wait_s=0.05)
        task = asyncio.create_task(batcher.run())
        requests = [[[1], [2]], [[-1]], [[3, 4]]]
        results = await asyncio.gather(*(batcher.score(r) for r in requests), return_exceptions=True)
        task.cancel()
        return results

    first, culprit, last = asyncio.run(scenario())
    assert first == [1.0, 2.0] and last == [7.0]
    assert isinstance(culprit, RequestError) and culprit.status == 500 and "poisoned" in str(culprit)
    assert calls[0] == [[1], [2], [-1], [3, 4]]  # one pass for all three requests, then one each
    assert calls[1:] == [[[1], [2]], [[-1]], [[3, 4]]]


def test_a_request_that_breaks_scoring_fails_alone_and_the_others_still_share_passes(
    serve_cfg, export_dir, alone, monkeypatch
):
    poison = "[BOS]Is 7 even or odd?[SEP]boom[EOS]"
    ids = Scorer(str(export_dir), False, 1).encode_text(poison)[1]
    score, passes = Scorer.score, []

    def poisoned(self: Scorer, sequences: list[list[int]], progress: Any = None) -> np.ndarray:
        passes.append(len(sequences))
        if ids in sequences:
            raise RuntimeError("boom")
        return score(self, sequences, progress)

    monkeypatch.setattr(Scorer, "score", poisoned)
    with serving(serve_cfg("max_wait_ms=100")) as url, ThreadPoolExecutor(21) as pool:
        texts = [honest(i) for i in range(20)] + [poison]
        answers = list(pool.map(lambda t: post(url, {"query": [t]}), texts))
    assert answers[-1][0] == 500 and "boom" in answers[-1][1]["error"]
    for text, (code, body) in zip(texts, answers[:-1]):
        assert code == 200 and body["rewards"][0] == pytest.approx(alone(text), abs=1e-4)
    assert max(passes) > 1  # concurrent requests went through the model together


TEXT_PIECES = ["[BOS]", "[SEP]", "[EOS]", "[PAD]", "[UNK]", " ", "\n", "\x00", "\ud800", "odd", "Is 7 even?", "é"]
items = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=30),
    st.lists(st.sampled_from(TEXT_PIECES), max_size=6).map("".join),
    st.none() | st.booleans() | st.integers() | st.floats() | st.lists(st.text(max_size=3), max_size=2),
)


@settings(max_examples=60, deadline=None)
@given(query=st.lists(items, max_size=6))
def test_fuzzed_items_are_scored_as_alone_or_the_named_item_is_refused_alone_too(url, alone, query):
    code, body = post(url, {"query": query})
    assert code in (200, 400), body
    if code == 200:
        assert np.allclose(body["rewards"], [alone(text) for text in query], atol=1e-4)
        return
    named = [int(i) for i in re.findall(r"query\[(\d+)\]", body["error"])]
    assert named and all(post(url, {"query": [query[i]]})[0] == 400 for i in named), body


def mutated(body: bytes) -> st.SearchStrategy[bytes]:
    edits = st.lists(st.tuples(st.integers(0, len(body) - 1), st.binary(max_size=3)), min_size=1, max_size=4)

    def apply(changes: list[tuple[int, bytes]]) -> bytes:
        out = bytearray(body)
        for at, new in changes:
            out[at : at + 1] = new
        return bytes(out)

    return edits.map(apply)


@settings(max_examples=60, deadline=None)
@given(body=st.binary(max_size=200) | mutated(json.dumps({"query": [honest(1), honest(2)]}).encode()))
def test_fuzzed_bodies_are_answered_never_with_500(url, body):
    code, answer = post(url, body)
    assert code in (200, 400, 413) and (code == 200) == ("rewards" in answer), answer


def test_load_300_clients_some_hostile_every_honest_one_answered_right(url, alone):
    rng = random.Random(1)
    good, garbage = json.dumps({"query": [honest(1)]}).encode(), bytes(rng.randrange(256) for _ in range(200))
    hostile = {
        "empty": lambda: post(url, {"query": [honest(3), ""]}),
        "blank response": lambda: post(url, {"prompts": ["p"], "responses": [" "]}),
        "wrong types": lambda: post(url, {"query": [honest(3), 5, None]}),
        "surrogate": lambda: post(url, {"query": ["\udc00" + honest(3)]}),
        "too many": lambda: post(url, {"query": [honest(3)] * 9}),
        "oversized": lambda: raw(url, with_length(b" " * 300_000 + good)),
        "lying length": lambda: raw(url, HEAD + b"Content-Length: 900\r\n\r\n" + good),
        "garbage": lambda: raw(url, garbage),
        "slow sender": lambda: raw(url, with_length(good), pause=0.05),
        "silent": lambda: raw(url, b""),
    }
    jobs: list[tuple[str, Any]] = []
    for i in range(200):
        if i % 3:
            jobs.append(("query", [honest(rng.randrange(1000)) for _ in range(rng.randint(1, 3))]))
        else:
            jobs.append(("pairs", [(f"Is {i} even or odd?", rng.choice(["odd", "even", "both"]))]))
    jobs += [(name, None) for name in hostile for _ in range(10)]
    rng.shuffle(jobs)
    barrier = threading.Barrier(len(jobs))

    def send(job: tuple[str, Any]) -> Any:
        kind, texts = job
        barrier.wait()
        if kind == "query":
            return post(url, {"query": texts})
        if kind == "pairs":
            return post(url, {"prompts": [p for p, _ in texts], "responses": [r for _, r in texts]})
        return hostile[kind]()

    start = time.monotonic()
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(send, jobs))
    assert time.monotonic() - start < 30
    for (kind, texts), answer in zip(jobs, answers):
        if kind in ("query", "pairs"):
            assert answer[0] == 200, (kind, answer)
            assert np.allclose(answer[1]["rewards"], [alone(t) for t in texts], atol=1e-4)
        elif isinstance(answer[0], int):
            assert answer[0] in (400, 413), (kind, answer)
        else:
            assert status(answer[0]) in (None, 400, 408, 413), (kind, answer)
    assert post(url, None, path="/health") == (200, {"status": "ok"})


def test_a_token_guards_get_reward_but_not_health(serve_cfg, monkeypatch, caplog):
    token = "s3cret-t0ken"
    monkeypatch.setenv("REWARDLAB_SERVE_TOKEN", token)
    caplog.set_level("DEBUG")
    with serving(serve_cfg()) as url:
        payload = {"query": [honest(1)]}
        for header in (None, "Bearer wrong", f"Basic {token}", f"Bearer {token}x", token, "Bearer \u00e9"):
            code, body = post(url, payload, {"Authorization": header} if header else None)
            assert code == 401 and token not in json.dumps(body), header
        assert post(url, payload, {"Authorization": f"Bearer {token}"})[0] == 200
        assert post(url, payload, {"Authorization": f"bearer  {token}"})[0] == 200
        assert post(url, None, path="/health") == (200, {"status": "ok"})
    assert token not in caplog.text


def test_the_configured_token_wins_and_an_empty_one_is_refused(monkeypatch):
    monkeypatch.setenv("REWARDLAB_SERVE_TOKEN", "from-env")
    assert auth_token(OmegaConf.create({"token": "from-config"})) == b"from-config"
    assert auth_token(OmegaConf.create({"token": None})) == b"from-env"
    monkeypatch.setenv("REWARDLAB_SERVE_TOKEN", " ")
    with pytest.raises(ValueError, match="empty"):
        auth_token(OmegaConf.create({"token": None}))
    monkeypatch.delenv("REWARDLAB_SERVE_TOKEN")
    assert auth_token(OmegaConf.create({"token": None})) is None


def test_cli_serves_and_logs_where_and_whether_auth_is_on(export_dir, alone, tmp_path):
    token = "cli-t0ken"
    process = subprocess.Popen(
        [sys.executable, "-m", "rewardlab.serve", f"model_dir={export_dir}", "port=0", "normalize=true"]
        + [f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        env={**os.environ, "REWARDLAB_SERVE_TOKEN": token, "PYTHONWARNINGS": "ignore"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    watchdog = threading.Timer(120, process.kill)  # a hung start fails the test instead of the suite
    watchdog.start()
    try:
        lines = []
        while not (lines and "serving" in lines[-1]):
            line = process.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        started = re.search(r"on (http://127\.0\.0\.1:\d+) .*auth on", lines[-1])
        assert started, lines[-1]
        url = started.group(1)
        assert post(url, {"query": [honest(1)]})[0] == 401
        code, body = post(url, {"query": [honest(1)]}, {"Authorization": f"Bearer {token}"})
        config = json.loads((export_dir / "config.json").read_text())
        normalized = (alone(honest(1)) - config["reward_mean"]) / config["reward_std"]
        assert code == 200 and body["rewards"][0] == pytest.approx(normalized, abs=1e-4)
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=30)[0]
        watchdog.cancel()
    assert process.returncode == 0, output
    assert token not in "".join(lines) + output + (tmp_path / "serve.log").read_text()


def test_a_huge_valid_request_costs_what_max_length_needs(serve_cfg):
    """Texts far beyond max_length are cut to what gets scored before they are tokenized, so a 4 MB
    body of digits parses in well under a second instead of holding the parser for seconds."""
    import time

    with serving(serve_cfg("max_text_chars=1000000", "max_body_bytes=5000000")) as base:
        started = time.perf_counter()
        status, body = post(base, {"query": ["[BOS]" + "7" * 999_000 + "[EOS]"] * 4})
        assert status == 200 and len(body["rewards"]) == 4
        status, body = post(base, {"prompts": ["p"] * 4, "responses": ["8" * 999_000] * 4})
        assert status == 200 and len(body["rewards"]) == 4
        assert time.perf_counter() - started < 5
