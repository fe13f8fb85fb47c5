"""Waiting with a deadline in tests: every wait either sees what it waits for or fails saying what it waited for.

``wait_until(predicate, timeout_s, what)`` polls; ``join(thread, timeout_s, what)`` joins. (A cluster started by
``epserve up`` is waited for through its state file: ``epserve.services.up_state.wait_ready``.)
"""
from __future__ import annotations

import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")


class WaitTimedOut(AssertionError):
    """A wait passed its deadline (an AssertionError: pytest reports it as the test failing)."""


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str, *, interval_s: float = 0.02,
               state: Callable[[], object] | None = None) -> T:
    """Calls ``predicate`` every ``interval_s`` until it returns something true, and returns that; after
    ``timeout_s`` fails with "gave up after ... waiting for <what>" (and ``state()``, when given, to show why)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            shown = f"; last state: {state()!r}" if state is not None else ""
            raise WaitTimedOut(f"gave up after {timeout_s:g} s waiting for {what}{shown}")
        time.sleep(interval_s)


def join(thread: threading.Thread, timeout_s: float, what: str) -> None:
    """``thread.join`` with a deadline that fails instead of returning with the thread still running."""
    thread.join(timeout_s)
    if thread.is_alive():
        raise WaitTimedOut(f"gave up after {timeout_s:g} s waiting for {what} (thread {thread.name} still running)")
