"""Prometheus metrics in the text exposition format (version 0.0.4), written by hand: each
family has one ``# HELP`` and one ``# TYPE`` line, then its samples; a histogram has cumulative
``_bucket{le="..."}`` samples ending in ``le="+Inf"``, then ``_sum`` and ``_count``. Updated from
the event loop and the worker thread, so every change holds one lock."""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if math.isnan(x):
        return "NaN"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Family:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.label_names = tuple(labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Family):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self.values: dict[tuple, float] = {} if labels else {(): 0.0}  # a plain series exists from the start

    def inc(self, *labels: str, by: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + by

    def set_total(self, value: float, *labels: str) -> None:
        """For a total counted elsewhere (the model session's), copied in at each scrape."""
        self.values[labels] = value

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in sorted(self.values.items())]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, *labels: str) -> None:
        self.values[labels] = value


class Histogram(_Family):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float], labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self.bounds = tuple(sorted(buckets))
        self.series: dict[tuple, list] = {}  # labels -> [counts per bucket (+Inf last), sum]
        if not labels:
            self.series[()] = [[0] * (len(self.bounds) + 1), 0.0]

    def observe(self, value: float, *labels: str) -> None:
        counts, _ = s = self.series.setdefault(labels, [[0] * (len(self.bounds) + 1), 0.0])
        counts[bisect.bisect_left(self.bounds, value)] += 1  # le is inclusive: value == bound counts there
        s[1] += value

    def lines(self) -> list[str]:
        out = []
        for k, (counts, total) in sorted(self.series.items()):
            running = 0
            for bound, n in zip((*self.bounds, math.inf), counts, strict=True):
                running += n
                le = 'le="' + _number(bound) + '"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, k, le)} {running}")
            out.append(f"{self.name}_sum{_labels(self.label_names, k)} {_number(total)}")
            out.append(f"{self.name}_count{_labels(self.label_names, k)} {running}")
        return out


class Registry:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.families: list[_Family] = []

    def add(self, family):
        self.families.append(family)
        return family

    def render(self) -> str:
        with self.lock:
            lines = []
            for f in self.families:
                lines += f.header() + f.lines()
        return "\n".join(lines) + "\n"


class ServerMetrics:
    """Every metric ``dymoe serve`` exports; the app and the worker call these under the lock."""

    def __init__(self, budgeted: bool) -> None:
        r = self.registry = Registry()
        self.lock = r.lock
        self.requests = r.add(Counter("dymoe_requests_total", "HTTP requests answered, by endpoint and status.",
                                      ("endpoint", "status")))
        self.generations = r.add(Counter("dymoe_generations_total", "Generations ended, by finish reason "
                                         "(stop, length, cancelled, error).", ("finish_reason",)))
        self.prompt_tokens = r.add(Counter("dymoe_prompt_tokens_total", "Prompt tokens of generations run."))
        self.completion_tokens = r.add(Counter("dymoe_completion_tokens_total", "Tokens generated."))
        self.ttft = r.add(Histogram("dymoe_time_to_first_token_seconds",
                                    "Request admitted to first token generated (queue wait and prefill).",
                                    TTFT_BUCKETS))
        self.tpot = r.add(Histogram("dymoe_time_per_output_token_seconds",
                                    "Time of each token after the first.", TPOT_BUCKETS))
        self.queue_wait = r.add(Histogram("dymoe_queue_wait_seconds", "Request admitted to its generation start.",
                                          TTFT_BUCKETS))
        self.duration = r.add(Histogram("dymoe_generation_duration_seconds",
                                        "Request admitted to its last token.", DURATION_BUCKETS))
        self.queue_depth = r.add(Gauge("dymoe_queue_depth", "Requests waiting for the model."))
        self.queue_capacity = r.add(Gauge("dymoe_queue_capacity", "Requests that may wait before 429s."))
        self.running = r.add(Gauge("dymoe_generations_running", "Generations running now (0 or 1)."))
        self.ready = r.add(Gauge("dymoe_model_ready", "1 once the model is loaded and serving."))
        self.rss = r.add(Gauge("process_resident_memory_bytes", "Resident set size of the server process."))
        self.resident = r.add(Gauge("dymoe_expert_resident_bytes", "Bytes of experts resident (and loading)."))
        self.budgeted = budgeted
        if not budgeted:  # every expert resident at one precision: no cache, no reads to report
            return
        self.expert_requests = r.add(Counter("dymoe_expert_requests_total",
                                             "Expert uses under a memory budget (--policy)."))
        self.expert_hits = r.add(Counter("dymoe_expert_hits_total", "Expert uses served from resident memory."))
        self.hit_rate = r.add(Gauge("dymoe_expert_cache_hit_ratio", "Expert hits over expert uses since start."))
        self.bytes_read = r.add(Counter("dymoe_expert_bytes_read_total", "Bytes of expert graphs read from storage."))
        self.budget = r.add(Gauge("dymoe_expert_budget_bytes", "The expert memory budget (--budget)."))

    def request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests.inc(endpoint, str(status))

    def generation(self, finish: str, prompt_tokens: int, completion_tokens: int, queue_wait_s: float,
                   ttft_s: float | None, token_times_s: Sequence[float], duration_s: float) -> None:
        with self.lock:
            self.generations.inc(finish)
            self.prompt_tokens.inc(by=prompt_tokens)
            self.completion_tokens.inc(by=completion_tokens)
            self.queue_wait.observe(queue_wait_s)
            if ttft_s is not None:
                self.ttft.observe(ttft_s)
            for t in token_times_s:
                self.tpot.observe(t)
            self.duration.observe(duration_s)

    def session_totals(self, totals: dict) -> None:
        """The model session's counters (see ``ModelSession.totals``), copied in at a scrape."""
        with self.lock:
            self.rss.set(totals.get("rss_bytes", 0))
            self.resident.set(totals.get("expert_resident_bytes", 0))
            if not self.budgeted or "expert_requests" not in totals:
                return
            self.expert_requests.set_total(totals["expert_requests"])
            self.expert_hits.set_total(totals["expert_hits"])
            req = totals["expert_requests"]
            self.hit_rate.set(totals["expert_hits"] / req if req else 0.0)
            self.bytes_read.set_total(totals["expert_bytes_read"])
            self.budget.set(totals["expert_budget_bytes"])

    def state(self, queue_depth: int, queue_capacity: int, running: int, ready: bool) -> None:
        with self.lock:
            self.queue_depth.set(queue_depth)
            self.queue_capacity.set(queue_capacity)
            self.running.set(running)
            self.ready.set(1 if ready else 0)

    def render(self) -> str:
        return self.registry.render()
