"""AttentionService: the router's view of one attention/prefill replica, served by ``grpc.aio``.

A router holds one ``Session`` stream per replica and submits every request it routes there on
it. The engine loop's courier hands each step's outputs to the event loop in one go per session, and
each session sends all of its requests' new tokens in one message: one wake-up and one message per
step and router, not one per request. A request ends with a finished event, with ``error`` set
when it was refused (INVALID_ARGUMENT, UNAVAILABLE while draining, RESOURCE_EXHAUSTED when full,
ALREADY_EXISTS while an earlier run of its id is still being aborted) or its step failed (INTERNAL); an abort, or the end of the
session (router gone), aborts the request on the engine, which frees its KV blocks at once. Each submit is one run
(numbered by the router): its events carry the run, and a session's abort or end aborts that run only, never a later
run of the same id (submitted by another router, or again on this session).
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import Callable

import grpc

from epserve.services.attention.engine_loop import AlreadyRunning, EngineLoop, StepError
from epserve.services.engine.engine import RequestOutput
from epserve.services.engine.params import InvalidParam
from epserve.services.params import FINISH_REASONS, logprobs_to_proto, sampling_from_proto
from epserve.services.proto import attention_pb2, attention_pb2_grpc, generation_pb2

SERVICE_NAME = "epserve.v1.AttentionService"
log = logging.getLogger(__name__)


class SessionOutputs:
    """The outputs of every request of one session, gathered until the session sends them.

    The courier thread ``put``s a step's outputs one by one; the first of a burst schedules one
    hand-over to the event loop, which takes the whole burst (one wake-up per step, not per request).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.ready = loop, asyncio.Event()
        self.events: list[attention_pb2.TokenEvent] = []        # on the loop
        self.failure: str | None = None
        self._incoming: list[attention_pb2.TokenEvent] = []      # from the courier, under _lock
        self._lock = threading.Lock()

    def put(self, item: RequestOutput | StepError, run: int) -> None:
        """From the engine's courier thread: an output of submission ``run``."""
        with self._lock:
            self._incoming.append(_event(item, run))
            if len(self._incoming) > 1:
                return                                     # a hand-over is already scheduled
        try:
            self.loop.call_soon_threadsafe(self._hand_over)
        except RuntimeError:                               # the server's loop is closed: shutting down
            pass

    def _hand_over(self) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, []
        self.events += incoming
        self.ready.set()

    def add(self, event: attention_pb2.TokenEvent) -> None:
        """On the loop."""
        self.events.append(event)
        self.ready.set()

    def fail(self, message: str) -> None:
        """On the loop: the session cannot go on."""
        self.failure = message
        self.ready.set()

    async def take(self) -> list[attention_pb2.TokenEvent]:
        """Every event gathered so far, waiting for at least one; RuntimeError once failed."""
        await self.ready.wait()
        self.ready.clear()
        if self.failure is not None:
            raise RuntimeError(self.failure)
        events, self.events = self.events, []
        return events


class RunOutputs:
    """The engine's outputs of one run (one submission on a session), which its events name."""

    def __init__(self, session: SessionOutputs, run: int):
        self.session, self.run = session, run

    def put(self, item: RequestOutput | StepError) -> None:
        self.session.put(item, self.run)


class AttentionServicer(attention_pb2_grpc.AttentionServiceServicer):
    def __init__(self, loop: EngineLoop, replica_id: str, placement_version: Callable[[], int], max_in_flight: int):
        self.loop = loop
        self.replica_id = replica_id
        self.placement_version = placement_version
        self.max_in_flight = max_in_flight             # running + waiting here, from every router together

    async def Session(self, request_iterator, context):
        outputs = SessionOutputs(asyncio.get_running_loop())
        running: dict[str, RunOutputs] = {}            # request id -> its run submitted on this session
        reader = asyncio.ensure_future(self._read_session(request_iterator, outputs, running))
        try:
            while True:
                try:
                    events = await outputs.take()
                except RuntimeError as err:
                    await context.abort(grpc.StatusCode.INTERNAL, f"replica {self.replica_id}: session failed: {err}")
                for event in events:
                    if event.finished and event.request_id in running and running[event.request_id].run == event.run:
                        del running[event.request_id]
                yield attention_pb2.SessionEvents(events=events)
        finally:                                       # the router went away or ended the session
            reader.cancel()
            for request_id, run in running.items():
                self.loop.abort(request_id, run)

    async def _read_session(self, request_iterator, outputs: SessionOutputs, running: dict[str, RunOutputs]) -> None:
        try:
            async for request in request_iterator:
                if request.HasField("submit"):
                    self._submit(request.submit, outputs, running)
                elif request.HasField("abort") and request.request_id in running:
                    run = running[request.request_id]
                    if run.run == request.run:
                        self.loop.abort(request.request_id, run)
        except Exception as err:                       # noqa: BLE001 - end the session, not the replica
            log.exception("replica %s: reading a session failed", self.replica_id)
            outputs.fail(f"{type(err).__name__}: {err}")

    def _submit(self, request: attention_pb2.SubmitRequest, outputs: SessionOutputs,
                running: dict[str, RunOutputs]) -> None:
        refuse = lambda code, message: outputs.add(_refused(request.request_id, code, message, request.run))  # noqa: E731
        if self.loop.draining:
            return refuse(grpc.StatusCode.UNAVAILABLE, f"replica {self.replica_id} is draining")
        if self.loop.in_flight() >= self.max_in_flight:
            return refuse(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"replica {self.replica_id} is full: {self.loop.in_flight()} requests running or waiting "
                          f"(at most {self.max_in_flight})")
        run = RunOutputs(outputs, request.run)
        try:
            params = sampling_from_proto(request.sampling, seed=request.seed)
            self.loop.submit(request.request_id, list(request.prompt_ids), params, run, list(request.emitted_ids))
        except InvalidParam as err:
            code = grpc.StatusCode.ALREADY_EXISTS if isinstance(err, AlreadyRunning) else grpc.StatusCode.INVALID_ARGUMENT
            return refuse(code, str(err))
        running[request.request_id] = run

    async def Abort(self, request, context):
        found = self.loop.abort(request.request_id)
        return generation_pb2.AbortResponse(request_id=request.request_id, found=found)

    async def Drain(self, request, context):
        """Stop admitting; wait (up to the call's deadline) until running requests have finished."""
        self.loop.draining = True
        while self.loop.in_flight():
            remaining = context.time_remaining()
            if remaining is not None and remaining < 0.2:
                break
            await asyncio.sleep(0.1)
        return attention_pb2.DrainResponse(request_id=request.request_id, remaining=self.loop.in_flight())

    async def GetLoad(self, request, context):
        load = self.loop.load()
        return attention_pb2.LoadReport(
            request_id=request.request_id, replica_id=self.replica_id, kv_blocks_total=load["kv_blocks_total"],
            kv_blocks_used=load["kv_blocks_used"], running=load["running"], waiting=load["waiting"],
            placement_version=self.placement_version(), draining=load["draining"])


def _event(item: RequestOutput | StepError, run: int) -> attention_pb2.TokenEvent:
    if isinstance(item, StepError):     # a hand-off is UNAVAILABLE: the router resumes it elsewhere
        code = grpc.StatusCode.UNAVAILABLE if item.handed_off else grpc.StatusCode.INTERNAL
        return _refused(item.request_id, code, item.message, run)
    return attention_pb2.TokenEvent(
        request_id=item.request_id, run=run, token_ids=item.new_token_ids, finished=item.finished,
        finish_reason=FINISH_REASONS.get(item.finish_reason, 0),
        usage=generation_pb2.Usage(prompt_tokens=item.prompt_tokens, completion_tokens=item.completion_tokens),
        logprobs=[logprobs_to_proto(lp) for lp in item.logprobs or ()])


def _refused(request_id: str, code: grpc.StatusCode, message: str, run: int) -> attention_pb2.TokenEvent:
    return attention_pb2.TokenEvent(request_id=request_id, run=run, finished=True,
                                    error=generation_pb2.Error(code=code.value[0], message=message))


def add_to_server(servicer: AttentionServicer):
    return lambda server: attention_pb2_grpc.add_AttentionServiceServicer_to_server(servicer, server)
