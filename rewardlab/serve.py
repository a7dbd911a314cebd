"""Serve an exported reward model over HTTP for RL loops:
`python -m rewardlab.serve model_dir=DIR [host=127.0.0.1] [port=8000]`.

Compatible with OpenRLHF's remote reward model protocol: `POST /get_reward` with
`{"query": [full texts]}` answers `{"rewards": [...]}`; `{"prompts": [...], "responses": [...]}`
is formatted as in training first. `GET /health` answers `{"status": "ok"}`. Requests from many
clients are batched together for the model; the server binds loopback by default and bounds the
body size, texts per request and text length, answering malformed requests with a 4xx and a
message.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from concurrent.futures import Future
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import hydra
from omegaconf import DictConfig

from rewardlab.data.rows import DataError
from rewardlab.scoring import Scorer

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the server refuses, with the HTTP status to answer."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class Batcher:
    """One worker thread owns the model: it takes waiting requests off a queue, scores up to
    `max_batch` sequences in one pass (waiting at most `max_wait_s` for more), and answers each."""

    def __init__(self, scorer: Scorer, max_batch: int, max_wait_s: float):
        self.scorer, self.max_batch, self.max_wait_s = scorer, max_batch, max_wait_s
        self.queue: queue.Queue[tuple[list[list[int]], Future]] = queue.Queue()
        self.worker = threading.Thread(target=self._run, name="reward-batcher", daemon=True)
        self.worker.start()

    def submit(self, sequences: list[list[int]]) -> Future:
        future: Future = Future()
        self.queue.put((sequences, future))
        return future

    def _run(self) -> None:
        while True:
            batch = [self.queue.get()]
            size = len(batch[0][0])
            while size < self.max_batch:
                try:
                    item = self.queue.get(timeout=self.max_wait_s)
                except queue.Empty:
                    break
                batch.append(item)
                size += len(item[0])
            try:
                rewards = self.scorer.score([ids for sequences, _ in batch for ids in sequences])
            except Exception as e:  # noqa: BLE001 - every waiting request hears about it
                for _, future in batch:
                    future.set_exception(e)
                continue
            start = 0
            for sequences, future in batch:
                future.set_result([float(r) for r in rewards[start : start + len(sequences)]])
                start += len(sequences)


def parse(body: bytes, cfg: DictConfig, scorer: Scorer) -> list[list[int]]:
    """Token ids for every text of a request, or a RequestError saying what is wrong with it."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body is not JSON: {e}") from None
    if not isinstance(request, dict) or not ({"query"} <= request.keys() or {"prompts", "responses"} <= request.keys()):
        raise RequestError(
            HTTPStatus.BAD_REQUEST, 'expected {"query": [texts]} or {"prompts": [...], "responses": [...]}'
        )
    fields = ("query",) if "query" in request else ("prompts", "responses")
    for name in fields:
        value = request[name]
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise RequestError(
                HTTPStatus.BAD_REQUEST, f'"{name}" must be a list of strings, got {json.dumps(value)[:80]}'
            )
        if len(value) > cfg.max_texts:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f'"{name}" has {len(value)} texts; at most {cfg.max_texts}'
            )
        if any(len(t) > cfg.max_text_chars for t in value):
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a text is longer than {cfg.max_text_chars} characters"
            )
    try:
        if "query" in request:
            return [scorer.encode_text(t)[1] for t in request["query"]]
        if len(request["prompts"]) != len(request["responses"]):
            raise RequestError(HTTPStatus.BAD_REQUEST, '"prompts" and "responses" must have the same length')
        return [scorer.encode(p, r)[1] for p, r in zip(request["prompts"], request["responses"])]
    except DataError as e:
        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, str(e)) from None


def make_server(cfg: DictConfig) -> ThreadingHTTPServer:
    """The HTTP server (not yet serving): `server.serve_forever()` runs it, `server.shutdown()` stops it."""
    scorer = Scorer(cfg.model_dir, cfg.trust_remote_code, cfg.batch_size, cfg.dtype)
    batcher = Batcher(scorer, cfg.batch_size, cfg.max_wait_ms / 1000)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            if self.path == "/health":
                self._answer(HTTPStatus.OK, {"status": "ok", "model": str(cfg.model_dir)})
            else:
                self._answer(HTTPStatus.NOT_FOUND, {"error": f"no route GET {self.path}; try /health"})

        def do_POST(self) -> None:  # noqa: N802
            try:
                if self.path != "/get_reward":
                    raise RequestError(HTTPStatus.NOT_FOUND, f"no route POST {self.path}; try /get_reward")
                length = int(self.headers.get("Content-Length") or 0)
                if length > cfg.max_body_bytes:
                    self.close_connection = True  # the unread body must not be taken for the next request
                    raise RequestError(
                        HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes; at most {cfg.max_body_bytes}"
                    )
                sequences = parse(self.rfile.read(length), cfg, scorer)
                rewards = batcher.submit(sequences).result(timeout=cfg.request_timeout_s) if sequences else []
                if cfg.normalize:
                    rewards = [scorer.normalized(r) for r in rewards]
                self._answer(HTTPStatus.OK, {"rewards": rewards})
            except RequestError as e:
                self._answer(e.status, {"error": str(e)})
            except Exception as e:  # noqa: BLE001 - the client gets an answer, the log gets the trace
                log.exception("request failed")
                self._answer(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {e}"})

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
            log.debug("%s " + format, self.address_string(), *args)

    ThreadingHTTPServer.request_queue_size = cfg.backlog
    server = ThreadingHTTPServer((cfg.host, cfg.port), Handler)
    server.daemon_threads = True
    return server


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    server = make_server(cfg)
    host, port = server.server_address[:2]
    log.info("serving %s on http://%s:%d (POST /get_reward, GET /health)", cfg.model_dir, host, port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped")
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
