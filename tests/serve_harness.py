"""Helpers for the server tests and benchmarks/serve_load.py: ``dymoe serve`` in a subprocess on
a loopback port the kernel picks, raw HTTP for what the openai client cannot send, and a load
generator bounded in clients, requests and time. Traffic goes to 127.0.0.1 only."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 120.0


class ServerProcess:
    """``dymoe serve BUNDLE --port 0 ...`` with its log in a file; ``url`` once it is listening."""

    def __init__(self, bundle: Path, *args: str, log: Path, env: dict | None = None) -> None:
        self.log = log
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dymoe.cli", "serve", str(bundle), "--host", LOOPBACK, "--port", "0", *args],
            stdout=subprocess.DEVNULL, stderr=self._log_file, env={**os.environ, **(env or {})})
        self.port = self._wait_for_port()
        self.url = f"http://{LOOPBACK}:{self.port}"

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            found = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", self.text())
            if found:
                return int(found.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError(f"dymoe serve exited with {self.proc.returncode}:\n{self.text()}")
            time.sleep(0.05)
        raise RuntimeError(f"dymoe serve did not start:\n{self.text()}")

    def wait_ready(self, headers: dict | None = None) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if request(self.port, "GET", "/health", headers=headers).status == 200:
                return
            time.sleep(0.05)
        raise RuntimeError(f"dymoe serve never became ready:\n{self.text()}")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child, by its process handle
            return self.proc.wait()
        finally:
            self._log_file.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class Response:
    status: int
    headers: dict
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def request(port: int, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
            timeout: float = 60.0) -> Response:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers={"content-type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    except ConnectionError:
        return Response(0, {}, b"")  # not listening yet, or the connection was closed on us
    finally:
        conn.close()


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 when the series does not exist yet)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    key = f"{name}{{{want}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


# --- load ------------------------------------------------------------------------------------

KINDS = ("completion", "completion-stream", "chat", "chat-stream")


@dataclass
class LoadResult:
    clients: int
    requests_per_client: int
    completed: int = 0
    rejected_429: int = 0
    wrong: list = field(default_factory=list)  # (kind, prompt, got, expected)
    errors: list = field(default_factory=list)  # (kind, error text)
    latencies_s: list = field(default_factory=list)  # completed requests, send to last byte
    ttfts_s: list = field(default_factory=list)  # streamed requests, send to first text
    completion_tokens: int = 0
    wall_s: float = 0.0

    def summary(self) -> dict:
        lat = np.asarray(self.latencies_s or [0.0])
        ttft = np.asarray(self.ttfts_s or [0.0])
        return {"clients": self.clients, "requests_per_client": self.requests_per_client,
                "requests": self.clients * self.requests_per_client, "completed": self.completed,
                "rejected_429": self.rejected_429, "wrong": len(self.wrong), "errors": len(self.errors),
                "latency_p50_s": float(np.percentile(lat, 50)), "latency_p99_s": float(np.percentile(lat, 99)),
                "latency_max_s": float(lat.max()), "stream_ttft_p50_s": float(np.percentile(ttft, 50)),
                "completion_tokens": self.completion_tokens, "wall_s": self.wall_s,
                "tokens_per_s": self.completion_tokens / self.wall_s if self.wall_s else 0.0}


def _ask(client, model: str, kind: str, prompt: str, max_tokens: int) -> tuple[str, int, float | None]:
    """One greedy request: (text, completion tokens, time to first text when streamed)."""
    t0 = time.perf_counter()
    chat = kind.startswith("chat")
    common = dict(model=model, max_tokens=max_tokens, temperature=0)
    if not kind.endswith("stream"):
        if chat:
            r = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common)
            return r.choices[0].message.content, r.usage.completion_tokens, None
        r = client.completions.create(prompt=prompt, **common)
        return r.choices[0].text, r.usage.completion_tokens, None
    opts = dict(stream=True, stream_options={"include_usage": True}, **common)
    stream = (client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **opts) if chat
              else client.completions.create(prompt=prompt, **opts))
    pieces, ttft, tokens = [], None, 0
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for c in chunk.choices:
            text = c.delta.content if chat else c.text
            if text:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                pieces.append(text)
    return "".join(pieces), tokens, ttft


def run_load(base_url: str, model: str, prompts: list[str], clients: int = 16, requests_per_client: int = 4,
             max_tokens: int = 16, api_key: str = "unused", timeout_s: float = 120.0) -> LoadResult:
    """``clients`` threads, each sending ``requests_per_client`` greedy requests back to back
    (kinds and prompts rotating); every answer is compared with the same request made alone
    beforehand, so a lost, cut or mixed-up answer counts as wrong. Retries are off: a 429 is
    counted, not hidden."""
    import openai

    def client():
        return openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=timeout_s)

    reference = client()
    expected = {(k, p): _ask(reference, model, k, p, max_tokens)[0] for k in ("completion", "chat") for p in prompts}
    result = LoadResult(clients, requests_per_client)
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def one_client(i: int) -> None:
        c = client()
        start.wait()  # all clients begin together: the queue fills at once
        for r in range(requests_per_client):
            kind, prompt = KINDS[(i + r) % len(KINDS)], prompts[(i * requests_per_client + r) % len(prompts)]
            t0 = time.perf_counter()
            try:
                text, tokens, ttft = _ask(c, model, kind, prompt, max_tokens)
            except openai.RateLimitError:
                with lock:
                    result.rejected_429 += 1
                continue
            except Exception as e:  # anything else is a failure the test reports
                with lock:
                    result.errors.append((kind, f"{e.__class__.__name__}: {e}"))
                continue
            elapsed = time.perf_counter() - t0
            with lock:
                want = expected[(kind.removesuffix("-stream"), prompt)]
                if text != want:
                    result.wrong.append((kind, prompt, text, want))
                    continue
                result.completed += 1
                result.latencies_s.append(elapsed)
                result.completion_tokens += tokens
                if ttft is not None:
                    result.ttfts_s.append(ttft)

    threads = [threading.Thread(target=one_client, args=(i,), daemon=True) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s * requests_per_client)
    result.wall_s = time.perf_counter() - t0
    if any(t.is_alive() for t in threads):
        result.errors.append(("load", "a client did not finish in time"))
    return result


class InProcessServer:
    """An ``App`` served by uvicorn on a thread of this process (port picked by the kernel), for
    tests that need to hold the model's hand: a load that waits, a generation that blocks."""

    def __init__(self, app, drain_timeout_s: float | None = None) -> None:
        import uvicorn

        from dymoe.serve.server import bind

        self.sock = bind(LOOPBACK, 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="critical", http="h11",
                                                    timeout_graceful_shutdown=drain_timeout_s))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds; the bound is generous, the test does not time anything."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
