"""The engine loop of an attention replica: one thread owns the engine; the service talks to it.

The service validates a request (read-only), then hands it over as a command; the loop
thread admits it, steps the engine while there is work, and delivers each request's outputs to that
request's queue. A courier thread does the handing over, so the loop thread goes on to the next
step at once: after every step it passes the tokens of all requests (and the logprobs of those that
asked) to ``on_step`` together (the attention service queues them for its token-log writer, which
must not block), then puts each output in its request's queue, in step order.

A resumed request (``emitted_ids``: the tokens its client has) hands those to ``on_step`` (from the loop
thread, before its first step) as a run at position 0: the positional token log takes only the ones it
lacks, which an earlier replica's writer may not have written yet, or ever (it died).

A step that fails (an expert shard went away, say) changes nothing: a sequence's KV and tokens only
advance when a step completes, and sampling is keyed by (seed, position). So the same step simply
runs again, after a backoff (``BACKOFF_S``, doubling up to ``MAX_BACKOFF_S``) that gives a restarted
shard time to register; a request that was running in more than ``step_retries`` failed steps fails
with the error and frees its KV. Commands (submits, aborts) are served during the backoff.
``between_steps`` runs in the loop thread before every step (and at least every 0.5 s when idle,
or at once on ``wake``): the attention service takes a new placement version there, and when it
did, a step that failed runs again without waiting out its backoff.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from epserve.services.engine.engine import LLMEngine, RequestOutput
from epserve.services.engine.params import InvalidParam, SamplingParams, TokenLogprobs

log = logging.getLogger(__name__)

BACKOFF_S = 0.25          # after the first failed step in a row; doubles with each
MAX_BACKOFF_S = 2.0


class AlreadyRunning(InvalidParam):
    """A request id that is still running here (an abort of an earlier run of it not yet through)."""


@dataclass
class StepError:
    """Delivered to a request's outputs instead of an output when it could not run or its step failed."""

    request_id: str
    message: str
    handed_off: bool = False               # not a failure: the replica is leaving, another may continue it
    finished = True                        # like a final RequestOutput: nothing follows it


class Outputs(Protocol):
    """Where a request's outputs go (the service's session); ``put`` is called from the courier and must not block."""

    def put(self, item: RequestOutput | StepError) -> None: ...


# per request: (new ids, how many it emitted before them, logprobs of those that asked)
StepTokens = Callable[[dict[str, list[int]], dict[str, int], dict[str, list[TokenLogprobs]]], None]


class EngineLoop:
    def __init__(self, engine: LLMEngine, on_step: StepTokens | None = None, *, step_retries: int,
                 between_steps: Callable[[], bool] | None = None):
        self.engine = engine
        self.on_step = on_step
        self.between_steps = between_steps             # loop thread, before each step: True if it changed something
        self.step_retries = step_retries
        self._failed_steps: dict[str, int] = {}        # request id -> failed steps it was running in
        self._failures_in_a_row = 0
        self._retry_at = 0.0                           # monotonic time before which no step runs
        self._progress_at = time.monotonic()           # the last step that completed, or the loop idle
        self._commands: queue.Queue = queue.Queue()
        self._outputs: dict[str, Outputs] = {}         # request id -> its outputs (courier writes)
        self._deliveries: queue.Queue = queue.Queue()  # (a step's: publish them, [outputs or step errors])
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._courier = threading.Thread(target=self._courier_run, name="engine-courier", daemon=True)
        self.draining = False

    def start(self) -> "EngineLoop":
        self._thread.start()
        self._courier.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._commands.put(None)
        self._thread.join(timeout=30)
        self._deliveries.put(None)
        self._courier.join(timeout=30)

    # ---- called from the service (any thread) ----------------------------------------------------
    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, outputs: Outputs,
               emitted_ids: list[int] = ()) -> None:
        """Validate (raises InvalidParam) and queue a request; its outputs will be put to ``outputs``."""
        self.engine.validate(list(prompt_ids), params, list(emitted_ids))
        with self._lock:
            if request_id in self._outputs:
                raise AlreadyRunning("request_id", f"{request_id!r} is already running on this replica")
            self._outputs[request_id] = outputs
        self._commands.put(("add", request_id, list(prompt_ids), params, list(emitted_ids)))

    def abort(self, request_id: str, outputs: Outputs | None = None) -> bool:
        """Abort the request (only while ``outputs`` are still its outputs, when given: that run of its id, not a
        later one); whether it was here. A later run's "add" is queued after this abort, so it cannot reach it."""
        with self._lock:
            current = self._outputs.get(request_id)
        known = current is not None and (outputs is None or current is outputs)
        if known:
            self._commands.put(("abort", request_id))
        return known

    def hand_off(self, reason: str) -> None:
        """End every request here with a hand-off (``StepError.handed_off``): their routers resubmit them,
        with the tokens emitted so far, to another replica. New requests are refused (``draining``)."""
        self.draining = True
        self._commands.put(("hand_off", reason))

    def wake(self) -> None:
        """Run ``between_steps`` now, even while backing off after a failed step."""
        self._commands.put(("wake",))

    def load(self) -> dict:
        """Counters for admission; read without locking (ints, updated by the loop thread)."""
        stats = dict(self.engine.stats())
        stats["draining"] = self.draining
        return stats

    def stalled_s(self) -> float:
        """Seconds the loop has had work without completing a step (0 when idle or stepping)."""
        if not self.engine.has_unfinished():
            return 0.0
        return time.monotonic() - self._progress_at

    def in_flight(self) -> int:
        with self._lock:
            return len(self._outputs)

    # ---- the loop thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopped.is_set():
            if self.between_steps is not None and self.between_steps():
                self._retry_at = 0.0                                            # a failed step may work now
            idle = not self.engine.has_unfinished()
            if idle:
                self._progress_at = time.monotonic()
            wait = 0.5 if idle else self._retry_at - time.monotonic()          # > 0: backing off
            try:
                command = self._commands.get(timeout=wait) if wait > 0 else self._commands.get_nowait()
            except queue.Empty:
                command = None
            while command is not None:
                self._apply(command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if self.engine.has_unfinished() and time.monotonic() >= self._retry_at:
                self._step()

    def _apply(self, command: tuple) -> None:
        if command[0] == "add":
            _, request_id, prompt_ids, params, emitted = command
            try:
                self.engine.add_request(request_id, prompt_ids, params, emitted)
            except ValueError as err:
                self._deliver(StepError(request_id, str(err)))
                return
            if emitted and self.on_step is not None:      # resumed: its log first gets what it lacks of them
                self.on_step({request_id: emitted}, {request_id: 0}, {})
        elif command[0] == "abort":
            output = self.engine.abort(command[1])
            if output is not None:
                self._deliver(output)
        elif command[0] == "hand_off":
            for request_id in list(self.engine.requests):
                self.engine.abort(request_id)
                self._deliver(StepError(request_id, command[1], handed_off=True))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as err:                          # noqa: BLE001 - run it again, keep serving
            self._step_failed(err)
            return
        self._failures_in_a_row = 0
        self._progress_at = time.monotonic()
        if self._failed_steps:
            self._failed_steps = {r: n for r, n in self._failed_steps.items() if r in self.engine.requests}
        if outputs:
            self._deliveries.put((True, outputs))

    def _step_failed(self, err: Exception) -> None:
        """Back off before the step runs again; fail the requests that were in too many failed steps."""
        self._failures_in_a_row += 1
        backoff = min(BACKOFF_S * 2 ** (self._failures_in_a_row - 1), MAX_BACKOFF_S)
        self._retry_at = time.monotonic() + backoff
        log.warning("engine step failed (%s); running it again in %.2f s", err, backoff,
                    exc_info=self._failures_in_a_row == 1)
        for seq in list(self.engine.scheduler.running):
            failed = self._failed_steps[seq.request_id] = self._failed_steps.get(seq.request_id, 0) + 1
            if failed > self.step_retries:
                self.engine.abort(seq.request_id)
                self._deliver(StepError(seq.request_id, f"engine step failed {failed} times: {err}"))

    def _deliver(self, item: RequestOutput | StepError) -> None:
        self._deliveries.put((False, [item]))

    # ---- the courier thread --------------------------------------------------------------------
    def _courier_run(self) -> None:
        while (delivery := self._deliveries.get()) is not None:
            a_step, items = delivery
            if a_step and self.on_step:
                self._publish(items)
            for item in items:
                try:
                    self._hand_over(item)
                except Exception:                         # noqa: BLE001 - one consumer must not stop the others
                    log.exception("handing over the output of %s failed", item.request_id)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        tokens = {o.request_id: o.new_token_ids for o in outputs if o.new_token_ids}
        offsets = {o.request_id: o.completion_tokens - len(o.new_token_ids) for o in outputs if o.new_token_ids}
        logprobs = {o.request_id: o.logprobs for o in outputs if o.new_token_ids and o.logprobs}
        try:
            self.on_step(tokens, offsets, logprobs)
        except Exception:                                 # noqa: BLE001 - the token log is best effort
            log.exception("publishing step tokens failed")

    def _hand_over(self, item: RequestOutput | StepError) -> None:
        with self._lock:
            outputs = (self._outputs.pop(item.request_id, None) if item.finished
                       else self._outputs.get(item.request_id))
        if outputs is not None:
            outputs.put(item)
