"""The attention replica's token-log writer: each engine step's tokens reach Redis from this thread.

The engine loop's courier hands a step's tokens to ``append`` (no I/O) and delivers them to clients
at once; this thread appends everything that queued up meanwhile in one pipeline, in step order
(one log entry per request per write). When Redis is slow or away it keeps the tokens and tries
again every ``retry_s``: an outage delays the log, never a token. The router, resuming a request,
waits a moment for a log that is behind what its client has received.
"""
from __future__ import annotations

import logging
import threading

from epserve.services.cluster.requests import RequestStore

log = logging.getLogger(__name__)


class TokenLogWriter:
    def __init__(self, store: RequestStore, retry_s: float = 0.5):
        self.store, self.retry_s = store, retry_s
        self._pending: dict[str, list[int]] = {}        # request id -> tokens not yet written, in order
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="token-log", daemon=True)
        self._thread.start()

    def append(self, tokens: dict[str, list[int]]) -> None:
        """Queue one step's new tokens per request (returns at once)."""
        with self._cond:
            for request_id, ids in tokens.items():
                self._pending.setdefault(request_id, []).extend(ids)
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
            try:
                self.store.append_tokens(batch)
            except Exception as err:                    # noqa: BLE001 - Redis away: keep them, in order
                log.warning("token log: writing %d requests' tokens failed (%s); retrying", len(batch), err)
                with self._cond:
                    for request_id, ids in self._pending.items():
                        batch.setdefault(request_id, []).extend(ids)
                    self._pending = batch
                    if self._stopped:
                        return
                    self._cond.wait(self.retry_s)
