"""``dymoe serve`` survives what a network throws at it: malformed JSON, wrong types, bodies too
large (declared, chunked or sent whole), bodies too slow, requests cut off at any point, clients
that vanish mid-stream, garbage instead of HTTP. Each gets the right status in OpenAI's error
shape where HTTP allows one, and afterwards the server still answers correctly. Then SIGTERM
drains (running and queued requests finish, exit status 0), the API key is checked on every
request, and start-up problems are two-line errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest
from serve_harness import LOOPBACK, ServerProcess, metric, request, wait_until

from dymoe.demo import ensure_demo_bundle
from dymoe.toolchain.synthetic import write_synthetic_checkpoint

pytestmark = pytest.mark.slow
LIMIT = 65536  # the test server's --max-body-bytes


@pytest.fixture(scope="module")
def bundle() -> Path:
    return ensure_demo_bundle()


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    log = tmp_path_factory.mktemp("robust") / "server.log"
    with ServerProcess(bundle, "--max-body-bytes", str(LIMIT), "--body-timeout", "1", "--model-name", "demo",
                       log=log) as s:
        s.wait_ready()
        yield s
        assert s.proc.poll() is None, s.text()  # alive after every test of the module
        assert "Traceback" not in s.text(), s.text()


def raw(port: int, data: bytes, read: bool = True, timeout: float = 30.0) -> bytes:
    """Send bytes as they are; return what comes back until the server closes or goes quiet."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        s.sendall(data)
        if not read:
            return b""
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and _complete(out):
                    break
        except (ConnectionResetError, TimeoutError):
            pass
        return out


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return body.endswith(b"0\r\n\r\n")  # chunked


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n%scontent-length: %d\r\n\r\n%s"
            % (path.encode(), extra, len(body), body))


def assert_openai_error(r, status: int, *needles: str) -> dict:
    assert r.status == status, (r.status, r.body)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for needle in needles:
        assert needle in error["message"], error
    return error


def assert_still_serving(server) -> None:
    r = request(server.port, "POST", "/v1/completions", {"prompt": "class Thread", "max_tokens": 4, "temperature": 0})
    assert r.status == 200 and r.json()["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("body, needle", [
    (b"{not json", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    (b"[" * 20000 + b"]" * 20000, "not valid JSON"),  # deeper than Python's JSON parser recurses
    (b"[1, 2]", "must be a JSON object"),
    (b'"a string"', "must be a JSON object"),
    (b'{"prompt": "x", "temperature": NaN}', "temperature must be a number"),
    (b'{"prompt": "x", "max_tokens": "ten"}', "max_tokens must be an integer"),
    (b'{"prompt": "x", "max_tokens": 0}', "at least 1"),
    (b'{"prompt": "x", "stream": "yes"}', "stream must be true or false"),
    (b'{"prompt": "x", "stop": [1]}', "stop must be"),
    (b'{"prompt": "x", "stream_options": 3}', "stream_options"),
    (b'{"prompt": "abc \\udcff def"}', "not valid UTF-8"),  # a lone surrogate, legal JSON
    (b'{"prompt": {"text": "x"}}', "prompt must be"),
    (b'{"prompt": "x", "top_p": true}', "top_p must be a number"),
], ids=["syntax", "empty", "bytes", "deep", "array", "string", "nan", "type", "zero", "bool", "stop", "options",
        "surrogate", "object", "top-p"])
def test_malformed_requests_are_400s(server, body, needle):
    r = request(server.port, "POST", "/v1/completions", body)
    assert_openai_error(r, 400, needle)


def test_chat_body_errors(server):
    for body, needle in [({"messages": "hi"}, "non-empty list"), ({"messages": [{"content": "x"}]}, "role"),
                         ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text parts"),
                         ({}, "messages is required")]:
        assert_openai_error(request(server.port, "POST", "/v1/chat/completions", body), 400, needle)


def test_routes_and_methods(server):
    error = assert_openai_error(request(server.port, "GET", "/v1/engines"), 404, "no such endpoint")
    assert error["code"] == "not_found"
    r = request(server.port, "GET", "/v1/completions")
    assert_openai_error(r, 405, "answers POST")
    assert r.headers["allow"] == "POST"


def test_bodies_too_large(server):
    declared = raw(server.port, b"POST /v1/completions HTTP/1.1\r\nhost: t\r\ncontent-length: 10000000\r\n\r\n")
    assert declared.startswith(b"HTTP/1.1 413") and b"body_too_large" in declared
    assert b"connection: close" in declared.lower()
    chunk = b"x" * 40000
    chunked = (b"POST /v1/completions HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
               + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 2 + b"0\r\n\r\n")
    assert raw(server.port, chunked).startswith(b"HTTP/1.1 413")  # no length declared: counted as it arrives
    try:  # sent whole: the server may answer 413 and close before the client has finished sending
        r = request(server.port, "POST", "/v1/completions", b'{"prompt": "' + b"a" * 8_000_000 + b'"}')
        assert r.status in (0, 413)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert_still_serving(server)


def test_a_body_that_never_arrives_times_out(server):
    with socket.create_connection((LOOPBACK, server.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: t\r\ncontent-length: 100\r\n\r\n{\"prompt\": ")
        answer = b""
        while chunk := s.recv(65536):  # --body-timeout 1: answered, then closed, long before this socket's 30 s
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer


def test_abrupt_disconnects(server):
    before = request(server.port, "GET", "/metrics").body.decode()
    # mid-stream: read the first event, then reset the connection
    body = json.dumps({"prompt": "The for statement is used to", "max_tokens": 200, "temperature": 0,
                       "stream": True}).encode()
    s = socket.create_connection((LOOPBACK, server.port), timeout=30)
    s.sendall(post("/v1/completions", body))
    seen = b""
    while b"data: " not in seen:  # the headers may come alone
        chunk = s.recv(65536)
        assert chunk, seen
        seen += chunk
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST, not FIN
    s.close()

    def cancelled() -> float:
        text = request(server.port, "GET", "/metrics").body.decode()
        return metric(text, "dymoe_generations_total", finish_reason="cancelled")

    wait_until(lambda: cancelled() > metric(before, "dymoe_generations_total", finish_reason="cancelled"),
               what="the streamed generation to be cancelled")
    after = request(server.port, "GET", "/metrics").body.decode()
    generated = metric(after, "dymoe_completion_tokens_total") - metric(before, "dymoe_completion_tokens_total")
    assert generated < 200  # stopped early, not run to max_tokens
    # before the answer: the whole request sent, then gone
    raw(server.port, post("/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 100}).encode()), read=False)
    # cut off inside the headers, inside the body, and not HTTP at all
    raw(server.port, b"POST /v1/completions HTTP/1.1\r\nhost: t\r\ncontent-le", read=False)
    raw(server.port, b"POST /v1/completions HTTP/1.1\r\nhost: t\r\ncontent-length: 50\r\n\r\n{\"pro", read=False)
    assert raw(server.port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64)).startswith(
        b"HTTP/1.1 400")  # a TLS hello: h11 refuses it
    assert raw(server.port, b"GET / HTTP/1.1\r\nhost: t\r\nx-big: " + b"a" * 100_000 + b"\r\n\r\n").startswith(
        b"HTTP/1.1 4")  # headers beyond the limit
    wait_until(lambda: request(server.port, "GET", "/metrics").body.decode().count('status="499"') > 0,
               what="the vanished client to be counted")
    assert_still_serving(server)


def test_sigterm_drains_running_and_queued_requests(bundle, tmp_path):
    server = ServerProcess(bundle, "--model-name", "demo", log=tmp_path / "server.log")
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        results: dict = {}

        def ask(name: str, stream: bool) -> None:
            try:
                r = client.completions.create(model="demo", prompt="A dictionary maps", max_tokens=240,
                                              temperature=0, stream=stream, stream_options=None)
                if stream:
                    chunks = list(r)
                    results[name] = ("".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason)
                else:
                    results[name] = (r.choices[0].text, r.choices[0].finish_reason)
            except Exception as e:  # reported by the assertions below
                results[name] = e

        threads = [threading.Thread(target=ask, args=("running", True)), threading.Thread(target=ask,
                                                                                         args=("queued", False))]
        threads[0].start()
        wait_until(lambda: metric(request(server.port, "GET", "/metrics").body.decode(),
                                  "dymoe_generations_running") == 1, what="the first generation")
        threads[1].start()
        # the first generation takes about a second; should it end before the second request
        # queues (a very slow machine), the drain is still checked on whatever is left
        wait_until(lambda: "queued" in results or metric(request(server.port, "GET", "/metrics").body.decode(),
                                                         "dymoe_queue_depth") == 1, what="the second request to queue")
        server.proc.terminate()  # SIGTERM
        for t in threads:
            t.join(120)
        assert server.proc.wait(120) == 0, server.text()
    finally:
        server.stop()
    assert isinstance(results["running"], tuple) and isinstance(results["queued"], tuple), results
    assert results["running"] == results["queued"] and results["running"][1] == "length"  # both whole
    log = server.text()
    assert "stopped (SIGTERM); every request was finished first" in log and "Traceback" not in log
    with pytest.raises(ConnectionError):  # the port is closed
        socket.create_connection((LOOPBACK, server.port), timeout=5).close()


@pytest.fixture(scope="module")
def bare_bundle(tmp_path_factory) -> Path:
    """A bundle without a chat template (the synthetic checkpoint has none)."""
    root = tmp_path_factory.mktemp("bare")
    write_synthetic_checkpoint(root / "src", hidden=64, intermediate=64, experts=4, layers=2, heads=4, kv_heads=2,
                               vocab=64, max_position_embeddings=32)
    proc = subprocess.run([sys.executable, "-m", "dymoe.cli", "export", root / "src", "--out", root / "b",
                           "--precisions", "fp32"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return root / "b"


def test_api_key_on_every_request_and_no_chat_template(bare_bundle, tmp_path):
    key = "k-" + os.urandom(8).hex()
    with ServerProcess(bare_bundle, log=tmp_path / "server.log", env={"DYMOE_API_KEY": key}) as server:
        server.wait_ready({"authorization": f"Bearer {key}"})
        assert key not in server.text()  # never logged
        for method, path in [("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"),
                             ("POST", "/v1/completions"), ("GET", "/nowhere")]:
            r = request(server.port, method, path, {"prompt": "w1"})
            assert_openai_error(r, 401, "API key")
            assert r.headers["www-authenticate"] == "Bearer"
        wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
        assert client.completions.create(model="b", prompt="w1 w2", max_tokens=3).usage.completion_tokens >= 1
        with pytest.raises(openai.BadRequestError, match="no chat template") as e:
            client.chat.completions.create(model="b", messages=[{"role": "user", "content": "w1"}])
        assert e.value.code == "no_chat_template"


def dymoe(*args, env: dict | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    argv = ["-c", code, *map(str, args)] if code else ["-m", "dymoe.cli", *map(str, args)]
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(lines) == 2, proc.stderr
    assert lines[0].startswith("error:") and lines[1].lstrip().startswith("hint:"), proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_startup_errors_are_two_lines(bare_bundle, tmp_path):
    assert_clean_error(dymoe("serve", tmp_path), "manifest.json")
    assert_clean_error(dymoe("serve", bare_bundle, "--queue-size", "-1"), "--queue-size")
    assert_clean_error(dymoe("serve", bare_bundle, "--precision", "int2"), "int2")
    assert_clean_error(dymoe("serve", bare_bundle, "--chat-template", tmp_path / "missing.jinja"), "--chat-template")
    (tmp_path / "broken.jinja").write_text("{% for %}")
    assert_clean_error(dymoe("serve", bare_bundle, "--chat-template", tmp_path / "broken.jinja"), "does not compile")
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_clean_error(dymoe("serve", bare_bundle, "--host", LOOPBACK, "--port", port), "already in use")
    block = ("import sys; sys.modules['uvicorn'] = None; sys.argv[0] = 'dymoe'; "
             "from dymoe.cli import main; main()")
    assert_clean_error(dymoe("serve", bare_bundle, code=block), "uvicorn", "pip install 'dymoe[serve]'")


def test_prompt_file_errors(bare_bundle, tmp_path):
    assert_clean_error(dymoe("run", bare_bundle, "--prompt-file", tmp_path / "nope.txt"), "--prompt-file")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    assert_clean_error(dymoe("run", bare_bundle, "--prompt-file", tmp_path / "latin1.txt"), "not UTF-8")
    both = dymoe("run", bare_bundle, "--prompt", "w1", "--prompt-file", tmp_path / "latin1.txt")
    assert both.returncode == 2 and "Traceback" not in both.stderr  # a usage error, like a missing --prompt
    proc = subprocess.run([sys.executable, "-m", "dymoe.cli", "run", bare_bundle, "--prompt-file", "-",
                           "--max-new-tokens", "2"], input="w1 w2\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
