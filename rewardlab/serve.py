"""Serve an exported reward model over HTTP for RL loops:
`python -m rewardlab.serve model_dir=DIR [host=127.0.0.1] [port=8000]` (Starlette on uvicorn).

OpenRLHF's remote reward protocol: `POST /get_reward` with `{"query": [full texts]}` answers
`{"rewards": [...]}` (an ensemble's export: `{"rewards": [...], "uncertainties": [...]}`, each reward's
heads' standard deviation, scaled like the rewards when `normalize`; an attributes export also answers
`"attributes": [{name: predicted rating}, ...]`, in the ratings' units, never normalised);
`{"prompts": [...], "responses": [...]}` is formatted as in training first.
`GET /health` answers `{"status": "ok"}`. Concurrent requests share forward passes, so one client
must not be able to hurt another: a request is read within `read_timeout_s` and `max_body_bytes`
(counted on the bytes read), parsed and checked item by item before it joins a batch (a bad item
is a 4xx naming its index), and a batch that fails anyway is scored request by request so that only
the culprit fails. With a token (`token=` or REWARDLAB_SERVE_TOKEN), `/get_reward` needs
`Authorization: Bearer <token>`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import Annotated, Any

import hydra
import uvicorn
from omegaconf import DictConfig
from pydantic import AfterValidator, BaseModel, ConfigDict, StrictStr, ValidationError, model_validator
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from rewardlab.checks import ConfigError
from rewardlab.data.rows import DataError
from rewardlab.errors import one_line_errors
from rewardlab.runfolder import claimed
from rewardlab.scoring import Scorer

log = logging.getLogger(__name__)

TOKEN_ENV = "REWARDLAB_SERVE_TOKEN"
USAGE = 'expected a JSON object {"query": [texts]} or {"prompts": [texts], "responses": [texts]}'


class RequestError(Exception):
    """A request the server refuses: the HTTP status and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def _plain(text: str) -> str:
    """Refuse characters that tokenizers choke on: NUL and lone surrogates (JSON allows "\\ud800")."""
    if "\x00" in text:
        raise ValueError(f"contains a NUL character at position {text.index(chr(0))}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"contains a lone surrogate {text[e.start]!r} at position {e.start}") from None
    return text


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("is empty or whitespace only")
    return text


Prompt = Annotated[StrictStr, AfterValidator(_plain)]
Text = Annotated[StrictStr, AfterValidator(_plain), AfterValidator(_not_blank)]


class Query(BaseModel):
    """Full formatted texts, as PPO sends them (OpenRLHF may add `prompts` and `labels`: ignored)."""

    model_config = ConfigDict(extra="ignore")
    query: list[Text]


class Pairs(BaseModel):
    """Prompts and responses, formatted as in training; like training, a blank response is refused
    (a prompt may be empty)."""

    model_config = ConfigDict(extra="ignore")
    prompts: list[Prompt]
    responses: list[Text]

    @model_validator(mode="after")
    def _same_length(self) -> Pairs:
        if len(self.prompts) != len(self.responses):
            raise ValueError(f'"prompts" has {len(self.prompts)} items but "responses" has {len(self.responses)}')
        return self


def _problems(error: ValidationError) -> str:
    """pydantic's errors as `query[3]: is empty or whitespace only; ...` (the first three)."""
    lines = []
    for e in error.errors(include_url=False):
        where = "".join(f"[{part}]" if isinstance(part, int) else str(part) for part in e["loc"])
        what = e["msg"].removeprefix("Value error, ")
        if e["type"].endswith("_type") or e["type"] == "missing":
            what += f", got {'nothing' if e['type'] == 'missing' else type(e['input']).__name__}"
        lines.append(f"{where}: {what}" if where else what)
    more = f" (and {len(lines) - 3} more)" if len(lines) > 3 else ""
    return "; ".join(lines[:3]) + more


class Batcher:
    """Owns the model: gathers waiting requests into one pass of about `max_batch` sequences
    (waiting `max_wait_s` for more when short), run on its own thread so the event loop keeps
    serving. If a combined pass raises, each request is scored alone so that only the culprit fails."""

    def __init__(self, score: Callable[[list[list[int]]], Any], max_batch: int, max_wait_s: float):
        self.score_fn, self.max_batch, self.max_wait_s = score, max_batch, max_wait_s
        self.waiting: deque[tuple[list[list[int]], asyncio.Future]] = deque()
        self.arrived = asyncio.Event()
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="reward-model")

    async def score(self, sequences: list[list[int]]) -> list[float]:
        if not sequences:
            return []
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((sequences, future))
        self.arrived.set()
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.arrived.wait()
            if sum(len(s) for s, _ in self.waiting) < self.max_batch:
                await asyncio.sleep(self.max_wait_s)
            batch: list[tuple[list[list[int]], asyncio.Future]] = []
            while self.waiting and sum(len(s) for s, _ in batch) < self.max_batch:
                batch.append(self.waiting.popleft())
            if not self.waiting:
                self.arrived.clear()
            batch = [(s, f) for s, f in batch if not f.done()]  # a cancelled one timed out or hung up
            if not batch:
                continue
            results = await loop.run_in_executor(self.thread, self._score_all, [s for s, _ in batch])
            for (_, future), result in zip(batch, results):
                if not future.done():
                    (future.set_exception if isinstance(result, Exception) else future.set_result)(result)

    def _score_all(self, requests: list[list[list[int]]]) -> list[list[float] | RequestError]:
        try:
            rewards = iter(self.score_fn([ids for sequences in requests for ids in sequences]).tolist())
            return [[next(rewards) for _ in sequences] for sequences in requests]
        except Exception as e:  # noqa: BLE001 - turned into one answer per request
            if len(requests) == 1:
                log.error("scoring a request failed", exc_info=e)
                return [RequestError(500, f"scoring failed: {type(e).__name__}: {e}")]
            log.warning("a batch of %d requests failed (%s); scoring each alone", len(requests), e)
            return [self._score_all([sequences])[0] for sequences in requests]


def auth_token(cfg: DictConfig) -> bytes | None:
    """`token` from the config, else REWARDLAB_SERVE_TOKEN; None: no auth. An empty one is a mistake."""
    token = cfg.token if cfg.token is not None else os.environ.get(TOKEN_ENV)
    if token is None:
        return None
    if not str(token).strip():
        raise ValueError(f"token (or {TOKEN_ENV}) is empty; unset it to serve without auth")
    return str(token).encode()


class RewardService:
    """The routes' state: the limits, the model and its batcher, a thread that parses bodies."""

    def __init__(self, cfg: DictConfig):
        self.cfg, self.token = cfg, auth_token(cfg)
        self.scorer = Scorer(cfg.model_dir, cfg.trust_remote_code, cfg.batch_size, cfg.dtype)
        if cfg.normalize and self.scorer.std is None:
            raise ConfigError(
                f"normalize=true: {cfg.model_dir}/config.json has no usable reward_mean and reward_std (finite, "
                "std > 0); serve unnormalised rewards (normalize=false) or export again"
            )
        tokenizer = self.scorer.tokenizer
        self.specials = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
        names = self.scorer.attributes
        score = (
            (lambda seqs: self.scorer.score(seqs, with_std=self.scorer.has_std, with_attributes=bool(names)))
            if self.scorer.has_std or names
            else self.scorer.score
        )
        self.batcher = Batcher(score, cfg.batch_size, cfg.max_wait_ms / 1000)
        self.parser = ThreadPoolExecutor(1, thread_name_prefix="reward-parse")  # one tokenizer user at a time

    def authorize(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), self.token)):
            raise RequestError(
                401, "missing or wrong token: send `Authorization: Bearer <token>`", {"WWW-Authenticate": "Bearer"}
            )

    async def read(self, request: Request) -> bytes:
        """The body, counted as it arrives (Content-Length is only a claim; chunked bodies have none),
        within `read_timeout_s`."""
        limit, declared = self.cfg.max_body_bytes, request.headers.get("content-length")
        if declared is None and "chunked" not in request.headers.get("transfer-encoding", "").lower():
            raise RequestError(411, "send a Content-Length header or a chunked body")
        if declared is not None and int(declared) > limit:  # h11 let only digits through
            raise RequestError(413, f"body of {declared} bytes; at most {limit}")

        async def collect() -> bytes:
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise RequestError(413, f"body of more than {limit} bytes")
            return bytes(body)

        try:
            return await asyncio.wait_for(collect(), self.cfg.read_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(408, f"the body did not arrive within {self.cfg.read_timeout_s} s") from None
        except ClientDisconnect:
            raise RequestError(400, "the client hung up before the end of the body") from None

    def parse(self, body: bytes) -> list[list[int]]:
        """Token ids for every text of a request, checked item by item; runs on the parser thread."""
        try:
            request = json.loads(body.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise RequestError(400, f"body is not UTF-8: {e}") from None
        except (ValueError, RecursionError) as e:  # bad syntax, 10**10000, [[[[...]]]]
            raise RequestError(400, f"body is not valid JSON: {str(e)[:200]}") from None
        if not isinstance(request, dict) or not ({"query", "prompts", "responses"} & request.keys()):
            got = f"keys {[k[:40] for k in list(request)[:5]]}" if isinstance(request, dict) else type(request).__name__
            raise RequestError(400, f"{USAGE}, got {got}")
        fields = ("query",) if "query" in request else ("prompts", "responses")
        for name in fields:
            value = request.get(name)
            if isinstance(value, list) and len(value) > self.cfg.max_texts:
                raise RequestError(413, f'"{name}" has {len(value)} texts; at most {self.cfg.max_texts}')
            for i, text in enumerate(value if isinstance(value, list) else []):
                if isinstance(text, str) and len(text) > self.cfg.max_text_chars:
                    raise RequestError(
                        413, f"{name}[{i}] has {len(text)} characters; at most {self.cfg.max_text_chars}"
                    )
        try:
            checked = Query.model_validate(request) if "query" in request else Pairs.model_validate(request)
        except ValidationError as e:
            raise RequestError(400, _problems(e)) from None
        if isinstance(checked, Query):
            return [self.checked(f"query[{i}]", self.scorer.encode_text, t) for i, t in enumerate(checked.query)]
        sequences = []
        for i, (prompt, response) in enumerate(zip(checked.prompts, checked.responses)):
            self.checked(f"responses[{i}]", self.user_text, response)
            sequences.append(self.checked(f"responses[{i}]", self.scorer.encode, prompt, response))
        return sequences

    def user_text(self, text: str) -> tuple[str, list[int]]:
        """A response's own ids as training tokenizes user text (a literal `[SEP]` is characters), of
        the part that gets scored (a text far beyond max_length keeps its end, as in training)."""
        text = self.scorer.formatter.cut(text)
        return text, self.scorer.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def checked(self, where: str, encode: Callable[..., tuple[str, list[int]]], *texts: str) -> list[int]:
        """The ids of `encode(*texts)`, refused unless some token besides the format's own special
        tokens (BOS, SEP, EOS, padding, ...) holds more than whitespace."""
        try:
            ids = encode(*texts)[1]
        except DataError as e:
            raise RequestError(400, f"{where}: {e}") from None
        if not self.scorer.tokenizer.decode([t for t in ids if t not in self.specials]).strip():
            raise RequestError(400, f"{where}: nothing to score besides the format's special tokens and whitespace")
        return ids

    async def get_reward(self, request: Request) -> JSONResponse:
        try:
            self.authorize(request)
            body = await self.read(request)
            sequences = await asyncio.get_running_loop().run_in_executor(self.parser, self.parse, body)
            try:
                rewards = await asyncio.wait_for(self.batcher.score(sequences), self.cfg.request_timeout_s)
            except asyncio.TimeoutError:
                raise RequestError(503, f"no reward within request_timeout_s={self.cfg.request_timeout_s}") from None
        except RequestError as e:
            return error(e.status, str(e), e.headers)
        answer = {"rewards": rewards}
        if self.scorer.has_std:  # each item is [reward, spread]
            answer = {"rewards": [r for r, _ in rewards], "uncertainties": [u for _, u in rewards]}
        elif self.scorer.attributes:  # each item is [reward, rating, ...]: the ratings in the data's units
            answer = {"rewards": [item[0] for item in rewards],
                      "attributes": [dict(zip(self.scorer.attributes, item[1:])) for item in rewards]}  # fmt: skip
        if self.cfg.normalize:
            answer["rewards"] = [self.scorer.normalized(r) for r in answer["rewards"]]
            if "uncertainties" in answer:  # in units of the statistics' std, as the rewards
                answer["uncertainties"] = [u / self.scorer.std for u in answer["uncertainties"]]
        return JSONResponse(answer)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """A refusal closes the connection: whatever the client still sends is never read as a request."""
    return JSONResponse({"error": message}, status, headers={"Connection": "close", **(headers or {})})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def no_route(request: Request, exc: HTTPException) -> JSONResponse:
    hint = f"no route {request.method} {request.url.path}; try POST /get_reward or GET /health"
    return error(exc.status_code, hint, exc.headers)


def make_app(cfg: DictConfig) -> Starlette:
    """The ASGI app, with the model loaded; its lifespan runs the batcher."""
    service = RewardService(cfg)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        batcher = asyncio.create_task(service.batcher.run())
        yield
        batcher.cancel()
        service.parser.shutdown(wait=False)
        service.batcher.thread.shutdown(wait=False)

    routes = [Route("/get_reward", service.get_reward, methods=["POST"]), Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: no_route}, lifespan=lifespan)


def protocol(head_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline on each request head: uvicorn arms no timer before the
    first request and cancels its keep-alive timer on any byte, so a client that sends nothing, or its
    headers byte by byte, would otherwise hold a connection forever."""

    class DeadlineH11Protocol(H11Protocol):
        head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._deadline(head_timeout_s)

        def connection_lost(self, exc: Exception | None) -> None:
            self._deadline(None)
            super().connection_lost(exc)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a head arrived; read_timeout_s now bounds the body
                self._deadline(None)

        def on_response_complete(self) -> None:
            self._deadline(head_timeout_s)  # for the next request's head
            super().on_response_complete()

        def _deadline(self, seconds: float | None) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
            self.head_timer = self.loop.call_later(seconds, self.transport.close) if seconds is not None else None

    return DeadlineH11Protocol


def make_server(cfg: DictConfig) -> tuple[uvicorn.Server, socket.socket]:
    """The uvicorn server (not yet running) and its bound socket: `server.run(sockets=[sock])` serves,
    `server.should_exit = True` stops it. Port 0 binds a free port (`sock.getsockname()`)."""
    config = uvicorn.Config(
        make_app(cfg),
        http=protocol(cfg.read_timeout_s),
        ws="none",
        lifespan="on",
        log_config=None,  # Hydra's logging stays
        log_level="warning",
        access_log=False,
        server_header=False,
        timeout_keep_alive=cfg.keep_alive_s,
        limit_concurrency=cfg.max_connections,
        backlog=cfg.backlog,
    )
    family, _, _, _, address = socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM)[0]
    return uvicorn.Server(config), socket.create_server(address, family=family, backlog=cfg.backlog)


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextmanager
def serving(cfg: DictConfig) -> Iterator[str]:
    """Serve on a background thread (tests, notebooks); yields the base URL once it answers."""
    server, sock = make_server(cfg)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="rewardlab-serve", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the reward server did not start; see the log")
            time.sleep(0.01)
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
@one_line_errors
def main(cfg: DictConfig) -> None:
    with claimed(cfg, results=None):
        serve(cfg)


def serve(cfg: DictConfig) -> None:
    """Serve until Ctrl-C."""
    server, sock = make_server(cfg)
    auth = f"on (bearer token from {'token=' if cfg.token is not None else TOKEN_ENV})" if auth_token(cfg) else "off"
    log.info("serving %s on %s (POST /get_reward, GET /health); auth %s", cfg.model_dir, url_of(sock), auth)
    try:
        server.run(sockets=[sock])  # uvicorn finishes the requests in flight on Ctrl-C, then re-raises it
    except KeyboardInterrupt:
        log.info("stopped")


if __name__ == "__main__":
    main()
