"""`dymoe serve` under load: concurrent clients (the openai package, retries off) send greedy
requests of four kinds (completion and chat, streamed or not) to one server on loopback; every
answer is checked against the same request made alone, and latency is reported.

    python benchmarks/serve_load.py [--clients 16] [--requests 4] [--max-tokens 16] [--queue-size 8]
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model NAME   # a server already running

Without --url it starts `dymoe serve` on the demo bundle (127.0.0.1, a free port) and stops it
after. Table on stdout, JSON in results/serve_load.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _common import show, write_json

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--queue-size", type=int, default=8, help="the started server's --queue-size")
    ap.add_argument("--url", help="a running server instead of starting one")
    ap.add_argument("--model", default="demo", help="the model id of the server at --url")
    args = ap.parse_args()

    from serve_harness import ServerProcess, request, run_load

    from dymoe.demo import demo_model_dir, ensure_demo_bundle

    prompts = [p for p in (demo_model_dir() / "prompts.txt").read_text().splitlines() if p]
    server = None
    if args.url is None:
        log = Path(tempfile.mkdtemp(prefix="dymoe-serve-load-")) / "server.log"
        server = ServerProcess(ensure_demo_bundle(), "--model-name", args.model, "--queue-size", str(args.queue_size),
                               "--no-access-log", log=log)
        server.wait_ready()
    url = args.url or server.url
    try:
        result = run_load(url, args.model, prompts, args.clients, args.requests, args.max_tokens)
        metrics = request(int(url.rsplit(":", 1)[1]), "GET", "/metrics").body.decode() if server else ""
    finally:
        if server is not None:
            server.stop()
    s = result.summary()
    show(f"dymoe serve: {args.clients} clients x {args.requests} requests, {args.max_tokens} tokens each, "
         f"queue {args.queue_size}",
         ["done", "429", "wrong", "errors", "p50 s", "p99 s", "max s", "TTFT p50 s", "tok/s"],
         [[s["completed"], s["rejected_429"], s["wrong"], s["errors"], s["latency_p50_s"], s["latency_p99_s"],
           s["latency_max_s"], s["stream_ttft_p50_s"], s["tokens_per_s"]]])
    for kind, text in result.errors[:5]:
        print(f"error ({kind}): {text}")
    write_json("serve_load", {"settings": vars(args), "summary": s, "latencies_s": result.latencies_s,
                              "server_metrics": metrics})


if __name__ == "__main__":
    main()
