"""tests/waiting.py: waits that end, and say what they waited for when they end without it."""
import threading
import time

import pytest

from tests.waiting import WaitTimedOut, join, wait_until

pytestmark = pytest.mark.unit


def test_wait_until_returns_the_first_true_value():
    calls = iter([0, None, "", 7])
    assert wait_until(lambda: next(calls), 5, "a value", interval_s=0) == 7


def test_wait_until_fails_saying_what_it_waited_for():
    start = time.monotonic()
    with pytest.raises(WaitTimedOut, match=r"gave up after 0.1 s waiting for the queue to fill; last state: 3"):
        wait_until(lambda: False, 0.1, "the queue to fill", state=lambda: 3)
    assert time.monotonic() - start < 5


def test_join_fails_while_the_thread_runs():
    release = threading.Event()
    thread = threading.Thread(target=release.wait, name="blocked")
    thread.start()
    with pytest.raises(WaitTimedOut, match="thread blocked still running"):
        join(thread, 0.05, "the worker")
    release.set()
    join(thread, 10, "the worker")
