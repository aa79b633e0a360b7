"""The server's admission and cancellation, with a model whose every step the test controls: 503
while the model loads, 429 at once when the queue is full, a waiting request withdrawn and a
running generation cancelled when their clients disconnect, and a failing generation answered
in OpenAI's error shape while the server stays up."""

from __future__ import annotations

import json
import socket
import threading

import pytest
from serve_harness import InProcessServer, metric, request, wait_until

from dymoe.bundle.errors import BundleError
from dymoe.demo import ensure_demo_bundle
from dymoe.runtime.bundle import Bundle
from dymoe.runtime.chat_template import bundle_chat_template
from dymoe.runtime.generate import GenerationResult
from dymoe.runtime.tokenizer import TextTokenizer
from dymoe.serve.app import App
from dymoe.serve.metrics import ServerMetrics
from dymoe.serve.options import ServeOptions
from dymoe.serve.prepare import Limits, Preparer
from dymoe.serve.worker import FAILED, Worker


class FakeSession:
    """Generates "t0 t1 ..." one token per step; a step waits until ``gate`` is open."""

    label = "fake"

    def __init__(self, open_gate: bool = False, fail: bool = False) -> None:
        self.gate = threading.Event()
        if open_gate:
            self.gate.set()
        self.fail = fail
        self.started = threading.Event()
        self.cancelled = threading.Event()

    def generate_ids(self, ids, max_new_tokens, temperature, top_p, seed, stream=None, cancel=None):
        self.started.set()
        if self.fail:
            raise RuntimeError("the accelerator caught fire")
        tokens, reason = [], "length"
        while len(tokens) < max_new_tokens:
            while not self.gate.wait(0.005):
                if cancel.is_set():
                    break
            if cancel.is_set():
                self.cancelled.set()
                reason = "cancelled"
                break
            tokens.append(len(tokens))
            stream(f"t{len(tokens) - 1} ")
        return GenerationResult(list(ids), tokens, 0.0, [0.0] * max(len(tokens) - 1, 0), reason)

    def totals(self) -> dict:
        return {"rss_bytes": 1, "expert_resident_bytes": 0}

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def parts():
    bundle = Bundle(ensure_demo_bundle())
    return TextTokenizer(bundle.tokenizer_path()), bundle_chat_template(bundle)


def make_app(parts, session, queue_size: int = 1, load_gate: threading.Event | None = None,
             load_error: Exception | None = None) -> tuple[App, Worker]:
    tokenizer, template = parts
    metrics = ServerMetrics(budgeted=False)

    def load():
        if load_gate is not None:
            load_gate.wait(60)
        if load_error is not None:
            raise load_error
        return session

    worker = Worker(load, queue_size, metrics)
    preparer = Preparer(tokenizer, template, Limits(context=256, vocab_size=4096, max_prompt_tokens=255,
                                                    max_tokens=64), "fake")
    return App(worker, preparer, ServeOptions(queue_size=queue_size), "fake", metrics), worker


def post_raw(port: int, body: dict) -> socket.socket:
    """A request sent and left open, so that the test can walk away from it."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
              b"content-length: %d\r\n\r\n%s" % (len(data), data))
    return s


def test_503_while_loading_then_ready(parts):
    gate = threading.Event()
    app, _ = make_app(parts, FakeSession(open_gate=True), load_gate=gate)
    with InProcessServer(app) as s:
        health = request(s.port, "GET", "/health")
        assert health.status == 503 and health.json()["status"] == "loading"
        r = request(s.port, "POST", "/v1/completions", {"prompt": "x"})
        assert r.status == 503 and r.json()["error"]["code"] == "model_not_ready" and r.headers["retry-after"]
        gate.set()
        wait_until(lambda: request(s.port, "GET", "/health").status == 200, what="ready")
        r = request(s.port, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 3})
        assert r.status == 200 and r.json()["choices"][0]["text"] == "t0 t1 t2 "


def test_a_model_that_fails_to_load_is_reported(parts):
    app, worker = make_app(parts, None, load_error=BundleError("expert_003.int4.onnx: checksum mismatch"))
    fatal = []
    worker.on_fatal = fatal.append
    with InProcessServer(app) as s:
        wait_until(lambda: worker.state == FAILED, what="the load to fail")
        assert request(s.port, "GET", "/health").json()["status"] == FAILED
    assert "checksum" in str(fatal[0])


def test_full_queue_429_then_disconnects_withdraw_and_cancel(parts):
    session = FakeSession()
    app, worker = make_app(parts, session, queue_size=1)
    with InProcessServer(app) as s:
        wait_until(lambda: request(s.port, "GET", "/health").status == 200, what="ready")
        running = post_raw(s.port, {"prompt": "a", "max_tokens": 50, "stream": True})
        wait_until(session.started.is_set, what="the first generation")
        waiting = post_raw(s.port, {"prompt": "b", "max_tokens": 5})
        wait_until(lambda: worker.queue_depth() == 1, what="the second request to queue")
        r = request(s.port, "POST", "/v1/completions", {"prompt": "c"})
        assert r.status == 429 and r.json()["error"]["code"] == "queue_full" and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        waiting.close()
        wait_until(lambda: worker.queue_depth() == 0, what="the waiting request to be withdrawn")
        assert not session.cancelled.is_set()  # withdrawing a waiting request leaves the running one alone
        running.close()
        wait_until(session.cancelled.is_set, what="the running generation to be cancelled")
        wait_until(lambda: worker.running is None, what="the worker to be free")
        session.gate.set()
        r = request(s.port, "POST", "/v1/completions", {"prompt": "d", "max_tokens": 2})
        assert r.status == 200 and r.json()["choices"][0]["text"] == "t0 t1 "
        text = request(s.port, "GET", "/metrics").body.decode()
        assert metric(text, "dymoe_requests_total", endpoint="/v1/completions", status="429") == 1
        assert metric(text, "dymoe_requests_total", endpoint="/v1/completions", status="499") == 1  # the withdrawn
        assert metric(text, "dymoe_generations_total", finish_reason="cancelled") == 1


def test_a_failing_generation_is_a_500_and_the_server_stays_up(parts):
    session = FakeSession(open_gate=True, fail=True)
    app, _ = make_app(parts, session)
    with InProcessServer(app) as s:
        wait_until(lambda: request(s.port, "GET", "/health").status == 200, what="ready")
        r = request(s.port, "POST", "/v1/completions", {"prompt": "x"})
        assert r.status == 500 and r.json()["error"]["code"] == "generation_failed"
        assert "caught fire" in r.json()["error"]["message"]
        r = request(s.port, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                               "stream": True})
        events = [line[6:] for line in r.body.decode().split("\n\n") if line.startswith("data: ")]
        assert r.status == 200 and json.loads(events[-2])["error"]["code"] == "generation_failed"
        assert events[-1] == "[DONE]"
        session.fail = False
        assert request(s.port, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}).status == 200


def test_requests_still_running_when_the_drain_times_out_end_cleanly(parts):
    session = FakeSession()  # never finishes by itself
    app, worker = make_app(parts, session)
    server = InProcessServer(app, drain_timeout_s=0.2)
    with server as s:
        wait_until(lambda: request(s.port, "GET", "/health").status == 200, what="ready")
        stream = post_raw(s.port, {"prompt": "a", "max_tokens": 50, "stream": True})
        wait_until(session.started.is_set, what="the generation")
        server.server.should_exit = True  # what SIGTERM does
        received = b""
        while not received.endswith(b"0\r\n\r\n"):  # the chunked stream's end
            chunk = stream.recv(65536)
            assert chunk, received
            received += chunk
    events = [e.strip() for e in received.split(b"\r\n") if e.startswith(b"data: ")]
    assert json.loads(events[-2][6:])["error"]["code"] == "server_shutting_down" and events[-1] == b"data: [DONE]"
    assert session.cancelled.is_set() and app.cut_off == 1
