"""The one thread that owns the model: it loads the bundle, then runs one generation at a time
from a bounded queue (the expert cache and the KV cache are single-threaded). The HTTP side never
blocks on it: a request is admitted or refused at once, and its text comes back through a
callback the event loop supplies. A job is stopped through its ``cancel`` event, which
``generate`` checks before every token; a waiting job is simply withdrawn from the queue."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dymoe.bundle.errors import DymoeError
from dymoe.runtime.model_session import ModelSession
from dymoe.runtime.stop_strings import StopStrings

from .errors import ApiError
from .metrics import ServerMetrics
from .prepare import GenRequest

log = logging.getLogger("dymoe.serve")

LOADING, READY, FAILED, STOPPED = "loading", "ready", "failed", "stopped"


@dataclass
class Delta:
    text: str


@dataclass
class Done:
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    error: ApiError


@dataclass
class Job:
    request: GenRequest
    emit: Callable[[object], None]  # Delta, Done or Failed; called on the worker thread
    seed: int  # the request's seed, or a fresh one drawn by the app
    cancel: threading.Event = field(default_factory=threading.Event)
    admitted_at: float = field(default_factory=time.monotonic)
    finished: bool = False


class Worker:
    def __init__(self, load: Callable[[], ModelSession], queue_size: int, metrics: ServerMetrics,
                 on_fatal: Callable[[BaseException], None] = lambda e: None) -> None:
        self._load = load
        self.queue_size = queue_size
        self.metrics = metrics
        self.on_fatal = on_fatal  # loading failed: the server should stop
        self.state = LOADING
        self.error: BaseException | None = None
        self.session: ModelSession | None = None
        self.totals: dict = {}  # the session's counters after the latest job (read by /metrics)
        self.running: Job | None = None
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        # a daemon: a model still loading when the server stops is not waited for
        self._thread = threading.Thread(target=self._main, name="dymoe-worker", daemon=True)

    # --- the HTTP side ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job`` or refuse it at once (503 while loading or stopping, 429 when full)."""
        with self._cond:
            if self.state != READY or self._stopping:
                raise ApiError(503, "the model is still loading; retry shortly" if self.state == LOADING
                               else "the server is shutting down", "model_not_ready", headers=(("retry-after", "1"),))
            if len(self._waiting) >= self.queue_size:
                raise ApiError(429, f"the server is busy: {len(self._waiting)} requests are waiting for the model; "
                                    "retry shortly", "queue_full", headers=(("retry-after", "1"),))
            self._waiting.append(job)
            self._cond.notify()

    def withdraw(self, job: Job) -> None:
        """The client went away: drop ``job`` if it waits, stop it if it runs."""
        job.cancel.set()
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                pass

    def queue_depth(self) -> int:
        return len(self._waiting)

    def stop(self, wait_s: float = 5.0) -> None:
        """Run what is queued, then end the thread and close the model (the server drained first)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self.state != LOADING:
            self._thread.join(wait_s)

    # --- the worker thread --------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self.session = self._load()
        except BaseException as e:  # reported to the server, which exits with it
            with self._cond:
                self.state, self.error = FAILED, e
            self.on_fatal(e)
            return
        self.totals = self.session.totals()
        with self._cond:
            self.state = READY
        try:
            while (job := self._next()) is not None:
                self.running = job
                try:
                    self._run(job)
                finally:
                    self.running = None
                    job.finished = True
                    self.totals = self.session.totals()
        finally:
            with self._cond:
                self.state = STOPPED
            self.session.close()

    def _next(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._stopping:
                self._cond.wait()
            return self._waiting.popleft() if self._waiting else None

    def _run(self, job: Job) -> None:
        req, started = job.request, time.monotonic()
        if job.cancel.is_set():  # withdrawn between the queue and here
            return
        stops = StopStrings(req.params.stop)

        def stream(text: str) -> None:
            shown = stops.push(text)
            if shown:
                job.emit(Delta(shown))
            if stops.stopped:
                job.cancel.set()  # a stop string: generate() ends before the next token

        try:
            result = self.session.generate_ids(req.prompt_ids, req.max_tokens, req.params.temperature,
                                               req.params.top_p, job.seed, stream=stream, cancel=job.cancel)
        except DymoeError as e:  # e.g. an expert that fails its checksum mid-run
            self._failed(job, started, ApiError(500, f"generation failed: {e.message}", "generation_failed"))
            return
        except Exception as e:  # one request fails; the server stays up
            log.exception("generation failed")
            self._failed(job, started, ApiError(500, f"generation failed: {e.__class__.__name__}: {e}",
                                                "generation_failed"))
            return
        tail = stops.flush()
        if tail:
            job.emit(Delta(tail))
        if stops.stopped or result.stop_reason == "eos":
            finish = "stop"
        elif result.stop_reason == "cancelled":
            finish = "cancelled"  # the client went away; nobody reads this
        else:
            finish = "length"
        job.emit(Done(finish, len(req.prompt_ids), len(result.token_ids)))
        self.metrics.generation(finish, len(req.prompt_ids), len(result.token_ids), started - job.admitted_at,
                                started - job.admitted_at + result.ttft_s, result.token_times_s,
                                time.monotonic() - job.admitted_at)

    def _failed(self, job: Job, started: float, error: ApiError) -> None:
        job.emit(Failed(error))
        self.metrics.generation("error", len(job.request.prompt_ids), 0, started - job.admitted_at, None, (),
                                time.monotonic() - job.admitted_at)
