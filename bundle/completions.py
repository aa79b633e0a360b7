"""Waiting for futures as they finish, safe against Ctrl-C.

``concurrent.futures.wait`` and ``as_completed`` lock every future's condition in a Python loop
(``_AcquireFutures``). A KeyboardInterrupt landing inside that loop leaves the conditions taken so far
locked by the main thread for good; the worker that later finishes such a future blocks forever in
``set_result``, and so does whatever then joins that worker: ``dymoe run`` hung on Ctrl-C instead of
exiting. Here each future reports itself through a done-callback into a queue: one lock at a time,
held only inside ``Future`` and ``SimpleQueue``'s own methods.
"""

from __future__ import annotations

import queue
from collections.abc import Iterable, Iterator
from concurrent.futures import Future

POLL_S = 0.5  # a timed wait, so that Ctrl-C is seen at once whatever the platform's lock waits do


class Completions:
    """Futures in the order they finish (done, failed or cancelled), each once."""

    def __init__(self, futures: Iterable[Future] = ()) -> None:
        self._done: queue.SimpleQueue[Future] = queue.SimpleQueue()
        self._waiting = 0
        for f in futures:
            self.add(f)

    def add(self, future: Future) -> None:
        self._waiting += 1
        future.add_done_callback(self._done.put)  # runs at once when it is already done

    def __len__(self) -> int:
        return self._waiting

    def next(self) -> Future:
        """The next future to finish (blocks until one does)."""
        if not self._waiting:
            raise ValueError("no future is waited for")
        while True:
            try:
                future = self._done.get(timeout=POLL_S)
            except queue.Empty:
                continue
            self._waiting -= 1
            return future


def as_done(futures: Iterable[Future]) -> Iterator[Future]:
    """``as_completed`` without its Ctrl-C hazard (no timeout)."""
    c = Completions(futures)
    while len(c):
        yield c.next()
