"""The router's side of ``AttentionService.Session``: one stream per attention replica, shared.

Every ``Generate`` routed to a replica submits on that replica's session and reads its own
events from a queue; one reader task per session hands each step's batch of events out::

    submit(SubmitRequest) -> Run: .events, an asyncio.Queue of TokenEvent  (until one with finished, or SessionBroken)
    abort(run)                                                             (its queue gets no more events)

Each submit is a run, numbered on its session: the replica tags the run's events with it, and an abort
names it. Events of an earlier run of the same request id (one a superseded call still had going, or a
refused resubmission's) are dropped, and an earlier run's abort never ends a later one.

A session whose stream breaks (replica gone) puts ``SessionBroken`` in every open queue; the next
``ReplicaSessions.get`` for that address opens a new stream. Everything runs on the serving loop.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass

import grpc

from epserve.services.cluster import cluster_tls
from epserve.services.cluster.cluster_tls import ClusterTls
from epserve.services.cluster.grpc_server import KEEPALIVE_CHANNEL, channel_options
from epserve.services.proto import attention_pb2, attention_pb2_grpc, generation_pb2

log = logging.getLogger(__name__)


@dataclass
class SessionBroken:
    """In place of a request's next event: its replica's stream ended with ``code``."""

    code: grpc.StatusCode
    details: str


@dataclass(eq=False)
class Run:
    """One submission of a request on a session: its number there, and the queue its events arrive in."""

    request_id: str
    run: int
    events: asyncio.Queue


class ReplicaSession:
    def __init__(self, stub: attention_pb2_grpc.AttentionServiceStub):
        self._outgoing: asyncio.Queue = asyncio.Queue()                # SessionRequest, None ends
        self._requests: dict[str, Run] = {}                            # request id -> its live run
        self._runs = itertools.count(1)
        self.broken: SessionBroken | None = None
        self._call = stub.Session(self._send())
        self._reader = asyncio.ensure_future(self._read())

    async def _send(self):
        while (request := await self._outgoing.get()) is not None:
            yield request

    def submit(self, request: attention_pb2.SubmitRequest) -> Run:
        """Submit ``request`` as a new run (a live earlier run of its id here is aborted, and gets no more events)."""
        run = Run(request.request_id, next(self._runs), asyncio.Queue())
        if self.broken is not None:
            run.events.put_nowait(self.broken)
            return run
        if request.request_id in self._requests:
            self.abort(self._requests[request.request_id])
        request.run = run.run
        self._requests[request.request_id] = run
        self._outgoing.put_nowait(attention_pb2.SessionRequest(request_id=request.request_id, submit=request))
        return run

    def abort(self, run: Run) -> None:
        """End ``run`` on the replica, if it is still the live run of its request here."""
        if self._requests.get(run.request_id) is run:
            del self._requests[run.request_id]
            if self.broken is None:
                self._outgoing.put_nowait(attention_pb2.SessionRequest(
                    request_id=run.request_id, run=run.run, abort=generation_pb2.AbortRequest(request_id=run.request_id)))

    async def _read(self) -> None:
        try:
            async for batch in self._call:
                for event in batch.events:
                    run = self._requests.get(event.request_id)
                    if run is None or (event.run and run.run != event.run):   # an earlier run's: nobody waits for it
                        continue                                              # (0: from a replica without runs)
                    if event.finished:
                        del self._requests[event.request_id]
                    run.events.put_nowait(event)
            self._break(grpc.StatusCode.UNAVAILABLE, "the replica ended the session")
        except grpc.aio.AioRpcError as err:
            self._break(err.code(), err.details() or err.code().name)
        except Exception as err:                                    # noqa: BLE001 - fail its requests, not the router
            log.exception("reading a session to an attention replica failed")
            self._break(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")
        except asyncio.CancelledError:
            self._break(grpc.StatusCode.CANCELLED, "session closed")
            raise

    def _break(self, code: grpc.StatusCode, details: str) -> None:
        self.broken = SessionBroken(code, details)
        for run in self._requests.values():
            run.events.put_nowait(self.broken)
        self._requests.clear()
        if code != grpc.StatusCode.CANCELLED:
            log.warning("session to an attention replica broke: %s %s", code.name, details)


class ReplicaSessions:
    """One ``grpc.aio`` channel and session per attention replica address (made on the serving loop)."""

    def __init__(self, max_message_bytes: int = 64 << 20, tls: ClusterTls | None = None):
        self._options = [*channel_options(max_message_bytes), *KEEPALIVE_CHANNEL]
        self._tls = tls                                  # mutual TLS to the replicas (cluster_tls)
        self._stubs: dict[str, attention_pb2_grpc.AttentionServiceStub] = {}
        self._sessions: dict[str, ReplicaSession] = {}

    def stub(self, address: str) -> attention_pb2_grpc.AttentionServiceStub:
        if address not in self._stubs:
            channel = cluster_tls.channel(address, self._tls, "attention", self._options, aio=True)
            self._stubs[address] = attention_pb2_grpc.AttentionServiceStub(channel)
        return self._stubs[address]

    def get(self, address: str) -> ReplicaSession:
        session = self._sessions.get(address)
        if session is None or session.broken is not None:
            session = self._sessions[address] = ReplicaSession(self.stub(address))
        return session
