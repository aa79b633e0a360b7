"""``dymoe serve`` under load, on loopback and bounded in count and time: 16 concurrent openai
clients x 4 greedy requests (completion and chat, streamed and not) against a queue of 8.
Every request gets its full answer (identical to the same request made alone) or a 429; the
server's own counters agree with what the clients saw, so nothing was lost. Latency is
printed (pytest -s), not asserted: benchmarks/serve_load.py reports it as a table."""

from __future__ import annotations

import pytest
from serve_harness import ServerProcess, metric, request, run_load

from dymoe.demo import demo_model_dir, ensure_demo_bundle

pytestmark = pytest.mark.slow
CLIENTS, REQUESTS, QUEUE = 16, 4, 8


def test_sixteen_clients_get_full_answers_or_429s(tmp_path):
    prompts = [p for p in (demo_model_dir() / "prompts.txt").read_text().splitlines() if p]
    with ServerProcess(ensure_demo_bundle(), "--model-name", "demo", "--queue-size", str(QUEUE), "--no-access-log",
                       log=tmp_path / "server.log") as server:
        server.wait_ready()
        result = run_load(server.url, "demo", prompts, CLIENTS, REQUESTS, max_tokens=16)
        text = request(server.port, "GET", "/metrics").body.decode()
        assert server.proc.poll() is None and "Traceback" not in server.text(), server.text()
    s = result.summary()
    print(f"\nload: {CLIENTS} clients x {REQUESTS} requests: {s['completed']} completed, {s['rejected_429']} "
          f"429s; latency p50 {s['latency_p50_s'] * 1e3:.0f} ms, p99 {s['latency_p99_s'] * 1e3:.0f} ms; "
          f"{s['tokens_per_s']:.0f} tokens/s")
    assert result.errors == [] and result.wrong == []
    assert result.completed + result.rejected_429 == CLIENTS * REQUESTS
    assert result.completed >= QUEUE + 1  # the first wave alone admits one running and QUEUE waiting
    references = 2 * len(prompts)  # run_load's requests made alone, before the load
    answered = sum(metric(text, "dymoe_requests_total", endpoint=e, status="200")
                   for e in ("/v1/completions", "/v1/chat/completions"))
    refused = sum(metric(text, "dymoe_requests_total", endpoint=e, status="429")
                  for e in ("/v1/completions", "/v1/chat/completions"))
    assert (answered, refused) == (result.completed + references, result.rejected_429)
    assert metric(text, "dymoe_generations_total", finish_reason="length") + metric(
        text, "dymoe_generations_total", finish_reason="stop") == answered
    assert metric(text, "dymoe_queue_depth") == 0 and metric(text, "dymoe_generations_running") == 0
