"""``dymoe serve`` through the ``openai`` package, as users call it: a live server on loopback
serving the demo bundle. Greedy answers are the same as ``dymoe run``'s, streamed and whole
answers agree, chat goes through the model's template, stop strings and seeds behave, errors
arrive as the client's exception classes, and /metrics is valid Prometheus text."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from serve_harness import ServerProcess, metric, request

from dymoe.demo import demo_model_dir, ensure_demo_bundle

MODEL = "demo"
PROMPT = "The for statement is used to"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle() -> Path:
    return ensure_demo_bundle()


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    with ServerProcess(bundle, "--model-name", MODEL, log=tmp_path_factory.mktemp("serve") / "server.log") as s:
        s.wait_ready()
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def dymoe_run(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dymoe.cli", "run", *map(str, args)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def streamed(stream, chat: bool) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join((c.choices[0].delta.content or "") if chat else c.choices[0].text for c in chunks if c.choices)
    return text, chunks


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "dymoe"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    health = request(server.port, "GET", "/health")
    assert health.status == 200 and health.json()["status"] == "ok"


def test_greedy_completion_is_what_dymoe_run_prints(bundle, client, tmp_path):
    run = dymoe_run(bundle, "--prompt", PROMPT, "--max-new-tokens", 24, "--metrics-json", tmp_path / "m.json")
    expected = run.stdout.removesuffix("\n")  # run ends its output with a newline
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    assert r.choices[0].text == expected and expected
    assert r.choices[0].finish_reason == "length"
    metrics = __import__("json").loads((tmp_path / "m.json").read_text())
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (metrics["prompt_tokens"], 24)
    text, chunks = streamed(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                                                      stream=True), chat=False)
    assert text == expected and len(chunks) > 5  # token by token, not one lump
    assert chunks[-1].choices[0].finish_reason == "length"
    (tmp_path / "prompt.txt").write_text(PROMPT + "\n")  # an editor's final newline is not part of the prompt
    assert dymoe_run(bundle, "--prompt-file", tmp_path / "prompt.txt", "--max-new-tokens", 24).stdout == run.stdout


def test_chat_uses_the_template_and_streams_the_same_text(client):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Python documentation."}, {"role": "user", "content": "What is a list?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    want = AutoTokenizer.from_pretrained(demo_model_dir()).apply_chat_template(messages, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(want["input_ids"])
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    text, chunks = streamed(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}), chat=True)
    assert text == r.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "a list?"}]  # content parts, joined
    r2 = client.chat.completions.create(model=MODEL, messages=[messages[0], {"role": "user", "content": parts}],
                                        max_tokens=4, temperature=0)
    assert r2.usage.prompt_tokens == r.usage.prompt_tokens + 1  # "What is\na list?": one newline token more


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_ends_and_trims_the_answer(client, stream):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    stop = full.strip()[4:8]
    assert len(stop.strip()) >= 2, full
    cut = full[: full.find(stop)]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "@@@"],
                                  stream=stream)
    text, chunks = streamed(r, chat=False) if stream else (r.choices[0].text, [r])
    assert text == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_seed_repeats_a_sampled_answer(client):
    ask = dict(model=MODEL, prompt="class Thread", max_tokens=16, temperature=1.0, top_p=0.95)
    a = client.completions.create(seed=7, **ask).choices[0].text
    assert client.completions.create(seed=7, **ask).choices[0].text == a
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       max_completion_tokens=3, temperature=0)  # the chat API's newer name
    assert r.usage.completion_tokens <= 3


@pytest.mark.parametrize("call, status, param, needle", [
    (dict(prompt=PROMPT, n=2), 400, "n", "not supported"),
    (dict(prompt=PROMPT, max_tokens=10_000), 400, "max_tokens", "more than this server allows"),
    (dict(prompt="word " * 400), 400, "prompt", "at most 255"),
    (dict(prompt=PROMPT, max_tokens=251), 400, "max_tokens", "context is 256 tokens"),
    (dict(prompt=PROMPT, temperature=3), 400, "temperature", "[0, 2]"),
    (dict(prompt=[5000, 1]), 400, "prompt", "outside the vocabulary"),
    (dict(prompt=""), 400, "prompt", "empty"),
    (dict(prompt=["a", "b"]), 400, "prompt", "one prompt per request"),
    (dict(prompt=PROMPT, stop=["a", "b", "c", "d", "e"]), 400, "stop", "at most 4"),
    (dict(prompt=PROMPT, echo=True), 400, "echo", "not supported"),
], ids=["n", "max-tokens", "long-prompt", "context", "temperature", "vocab", "empty", "two-prompts", "stops", "echo"])
def test_bad_completion_requests_are_400s_naming_the_field(client, call, status, param, needle):
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=MODEL, **call)
    assert e.value.status_code == status
    assert e.value.param == param and needle in e.value.message, e.value.message


def test_bad_chat_requests(client):
    with pytest.raises(openai.BadRequestError, match="roles system, user and assistant"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="non-empty list"):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], logprobs=True)
    with pytest.raises(openai.NotFoundError, match="does not exist") as e:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"


def test_metrics_are_valid_prometheus_text(server, client):
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    r = request(server.port, "GET", "/metrics")
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.body.decode()
    types, seen = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name not in types  # one TYPE line per family
            types[name] = kind
        elif line and not line.startswith("#"):
            name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0)
            family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
            assert family in types, line
            seen.add(family)
            float(line.rsplit(" ", 1)[1])
    for name, kind in types.items():
        if kind == "histogram":
            buckets = [float(v) for v in re.findall(rf"^{name}_bucket{{le=\"[^\"]+\"}} (\S+)$", text, re.M)]
            assert buckets == sorted(buckets) and re.search(rf'^{name}_bucket{{le="\+Inf"}} ', text, re.M)
            assert buckets[-1] == metric(text, f"{name}_count")
    for family in ("dymoe_requests_total", "dymoe_time_to_first_token_seconds", "dymoe_time_per_output_token_seconds",
                   "dymoe_queue_depth", "dymoe_expert_resident_bytes", "process_resident_memory_bytes"):
        assert family in seen
    assert metric(text, "dymoe_requests_total", endpoint="/v1/completions", status="200") >= 1
    assert metric(text, "dymoe_completion_tokens_total") >= 4
    assert metric(text, "dymoe_time_to_first_token_seconds_count") >= 1
    assert metric(text, "dymoe_model_ready") == 1


def test_under_a_memory_budget_the_cache_metrics_are_served(bundle, client, tmp_path):
    """The same greedy answer from a server whose experts load under a budget (--policy lru,
    all experts at the top precision), and its expert cache reported in /metrics."""
    want = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    with ServerProcess(bundle, "--model-name", MODEL, "--policy", "lru", "--budget", "30%",
                       log=tmp_path / "server.log") as server:
        server.wait_ready()
        budgeted = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        ids = budgeted.completions.create(model=MODEL, prompt=list(range(100, 106)), max_tokens=2).usage
        assert ids.prompt_tokens == 6  # a prompt given as token ids
        got = budgeted.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
        text = request(server.port, "GET", "/metrics").body.decode()
    assert got.choices[0].text == want.choices[0].text
    uses, hits = metric(text, "dymoe_expert_requests_total"), metric(text, "dymoe_expert_hits_total")
    assert uses > 0 and 0 <= hits <= uses
    assert metric(text, "dymoe_expert_cache_hit_ratio") == pytest.approx(hits / uses)
    assert metric(text, "dymoe_expert_bytes_read_total") > 0
    assert 0 < metric(text, "dymoe_expert_resident_bytes") <= metric(text, "dymoe_expert_budget_bytes")
