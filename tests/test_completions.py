"""Futures as they finish (bundle/completions.py): in finishing order, each once, and a Ctrl-C while
waiting leaves every future completable (concurrent.futures.wait could leave their locks taken, and the
worker finishing one then hung, and with it the exit)."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import Future

import pytest

from dymoe.bundle.completions import Completions, as_done


def test_futures_come_in_the_order_they_finish():
    fs = [Future() for _ in range(5)]
    fs[3].set_result(3)  # done before it is waited for
    assert fs[1].cancel()
    order = [4, 0, 2]

    def finish():
        for i in order:
            time.sleep(0.02)
            fs[i].set_result(i)

    threading.Thread(target=finish).start()
    got = list(as_done(fs))
    assert got[:2] == [fs[1], fs[3]]  # already settled: at once, in the order they were added
    assert got[2:] == [fs[i] for i in order]
    assert len(got) == len(set(map(id, got))) == 5


def test_nothing_to_wait_for_is_an_error():
    c = Completions()
    assert len(c) == 0
    with pytest.raises(ValueError, match="no future"):
        c.next()


def test_failures_are_delivered_like_results():
    ok, bad = Future(), Future()
    c = Completions([ok, bad])
    bad.set_exception(RuntimeError("load failed"))
    assert c.next() is bad and isinstance(bad.exception(), RuntimeError)
    ok.set_result(1)
    assert c.next() is ok and len(c) == 0


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals go to the main thread")
def test_ctrl_c_while_waiting_leaves_every_future_completable():
    for delay in (0.05, 0.15, 0.3):
        fs = [Future() for _ in range(64)]
        c = Completions(fs)
        timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            c.next()
        timer.join()
        worker = threading.Thread(target=lambda fs=fs: [f.set_result(None) for f in fs], daemon=True)
        worker.start()
        worker.join(timeout=5)
        assert not worker.is_alive(), "a worker hung finishing a future the interrupted wait left locked"
        assert all(f.done() for f in fs)
