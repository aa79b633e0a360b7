"""A generation stops cleanly when asked: the cancel event is checked before every token, from
the token callback or from another thread, and the session generates normally afterwards."""

from __future__ import annotations

import threading

import pytest

from dymoe.demo import ensure_demo_bundle
from dymoe.runtime.generate import generate
from dymoe.runtime.model_session import open_model


@pytest.fixture(scope="module")
def session():
    s = open_model(ensure_demo_bundle(), precision="fp32")
    yield s
    s.close()


def test_cancel_from_the_token_callback_stops_after_that_token(session):
    cancel, seen = threading.Event(), []

    def on_token(t: int) -> None:
        seen.append(t)
        if len(seen) == 3:
            cancel.set()

    ids = session.tokenizer.encode("The for statement is used to")
    result = generate(session.model, ids, 40, on_token=on_token, cancel=cancel, eos_ids=[])
    assert result.stop_reason == "cancelled"
    assert result.token_ids == seen and len(seen) == 3


def test_a_cancelled_session_generates_the_same_text_afterwards(session):
    full = session.generate("The for statement is used to", max_new_tokens=12)
    cancel = threading.Event()
    cancel.set()  # set before the start (another thread's request): only the prefill's token is made
    cut = session.generate("The for statement is used to", max_new_tokens=12, cancel=cancel)
    assert cut.stop_reason == "cancelled" and cut.token_ids == full.token_ids[:1]
    again = session.generate("The for statement is used to", max_new_tokens=12)
    assert again.token_ids == full.token_ids


def test_session_totals_without_a_policy(session):
    totals = session.totals()
    assert totals["rss_bytes"] > 0 and totals["expert_resident_bytes"] > 0
    assert "expert_requests" not in totals  # every expert resident: no cache to count
