"""The attention replica's token-log writer: each engine step's tokens reach Redis from this thread.

The engine loop's courier hands a step's tokens (and the logprobs of those of requests that asked for
them) to ``append`` (no I/O) and delivers them to clients at once; this thread appends everything
that queued up meanwhile in one pipeline, in step order (one log entry per request per write). When
Redis is slow or away it keeps the tokens and tries again every ``retry_s``: an outage delays the
log, never a token. The router, resuming a request, waits a moment for a log that is behind what
its client has received.
"""
from __future__ import annotations

import logging
import threading

from epserve.services.cluster.requests import RequestStore
from epserve.services.engine.params import TokenLogprobs
from epserve.services.params import logprobs_to_log

log = logging.getLogger(__name__)


class TokenLogWriter:
    def __init__(self, store: RequestStore, retry_s: float = 0.5):
        self.store, self.retry_s = store, retry_s
        self._pending: dict[str, list[int]] = {}        # request id -> tokens not yet written, in order
        self._pending_logprobs: dict[str, list] = {}    # request id -> their logprobs (log entries), if it asked
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="token-log", daemon=True)
        self._thread.start()

    def append(self, tokens: dict[str, list[int]], logprobs: dict[str, list[TokenLogprobs]] | None = None) -> None:
        """Queue one step's new tokens per request, and their logprobs per request that asked (returns at once)."""
        with self._cond:
            _extend(self._pending, tokens)
            _extend(self._pending_logprobs, {rid: [logprobs_to_log(lp) for lp in lps]
                                             for rid, lps in (logprobs or {}).items()})
            self._cond.notify()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (up to ``timeout_s``), then stop."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopped:
                    self._cond.wait()
                if not self._pending:
                    return
                batch, self._pending = self._pending, {}
                logprobs, self._pending_logprobs = self._pending_logprobs, {}
            try:
                self.store.append_tokens(batch, logprobs)
            except Exception as err:                    # noqa: BLE001 - Redis away: keep them, in order
                log.warning("token log: writing %d requests' tokens failed (%s); retrying", len(batch), err)
                with self._cond:
                    self._pending = _extend(batch, self._pending)
                    self._pending_logprobs = _extend(logprobs, self._pending_logprobs)
                    if self._stopped:
                        return
                    self._cond.wait(self.retry_s)


def _extend(into: dict[str, list], more: dict[str, list]) -> dict[str, list]:
    """Each request's list in ``into`` extended by its list in ``more`` (in place); -> ``into``."""
    for request_id, items in more.items():
        into.setdefault(request_id, []).extend(items)
    return into
