"""The attention replica's token-log writer: each engine step's tokens reach Redis from this thread.

The engine loop's courier hands a step's tokens (and the logprobs of those of requests that asked for
them) to ``append`` (no I/O) and delivers them to clients at once; this thread appends everything
that queued up meanwhile in one pipeline, in step order (one log entry per run of a request's
consecutive tokens). When Redis is slow or away it keeps the tokens and tries again every
``retry_s``: an outage delays the log, never a token. The log is positional (each run says how many
tokens its request emitted before it), so a retried write that had landed after all (a timeout)
logs nothing twice. The router, resuming a request, waits a moment for a log that is behind what
its client has received.
"""
from __future__ import annotations

import logging
import threading

from epserve.services.cluster.requests import RequestStore, TokenRun
from epserve.services.engine.params import TokenLogprobs
from epserve.services.params import logprobs_to_log

log = logging.getLogger(__name__)


class TokenLogWriter:
    def __init__(self, store: RequestStore, retry_s: float = 0.5):
        self.store, self.retry_s = store, retry_s
        self._pending: list[TokenRun] = []             # not yet written, in step order
        self._last: dict[str, TokenRun] = {}           # request id -> its last pending run (a step extends it)
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="token-log", daemon=True)
        self._thread.start()

    def append(self, tokens: dict[str, list[int]], offsets: dict[str, int],
               logprobs: dict[str, list[TokenLogprobs]] | None = None) -> None:
        """Queue one step's new tokens per request (``offsets``: how many each emitted before them), and their
        logprobs per request that asked (returns at once)."""
        logprobs = logprobs or {}
        with self._cond:
            for request_id, ids in tokens.items():
                entries = [logprobs_to_log(lp) for lp in logprobs[request_id]] if request_id in logprobs else None
                self._queue(TokenRun(request_id, offsets[request_id], list(ids), entries))
            self._cond.notify()

    def _queue(self, run: TokenRun) -> None:
        """Extend the request's last pending run with ``run`` when it continues it, else queue it (under _cond)."""
        last = self._last.get(run.request_id)
        if last is not None and last.offset + len(last.ids) == run.offset and \
                (last.logprobs is None) == (run.logprobs is None):
            last.ids += run.ids
            last.logprobs = None if last.logprobs is None else last.logprobs + run.logprobs
            return
        self._pending.append(run)
        self._last[run.request_id] = run

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
                runs, self._pending, self._last = self._pending, [], {}
            try:
                self.store.append_tokens(runs)
            except Exception as err:                    # noqa: BLE001 - Redis away: keep them, in order
                log.warning("token log: writing %d runs of tokens failed (%s); retrying", len(runs), err)
                with self._cond:                        # the log skips what landed (it is positional)
                    self._pending = runs + self._pending
                    for run in reversed(runs):          # the next step extends a request's last run
                        self._last.setdefault(run.request_id, run)
                    if self._stopped:
                        return
                    self._cond.wait(self.retry_s)
