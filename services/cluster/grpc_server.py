"""One way to start an epserve gRPC server: the caller's servicers + health + reflection.

Every service (router, attention, expert shard) serves ``grpc.health.v1.Health`` (each of its
service names and ``""`` start SERVING; ``enter_graceful_shutdown()`` sets NOT_SERVING to drain) and
server reflection (so ``grpcurl`` works without protos). Message-size limits apply to both
directions. ``start_grpc_server`` builds the sync server with a thread pool: a stream holds one
worker thread for its whole life, so ``max_workers`` bounds concurrent streams plus unary calls.
``start_aio_grpc_server`` builds a ``grpc.aio`` server on its own event-loop thread: every call is
a coroutine there, so many long streams fed from one producer (an engine step's tokens) cost one
thread wake-up per batch instead of one per stream.

``health_address`` also serves ``grpc.health.v1.Health/Check`` alone, in plaintext, on a second port: for
kubelet's gRPC probes, which cannot present the client certificate a mutual-TLS port asks for (no
``Watch``: an unauthenticated caller must not hold its few threads with open streams).
"""
from __future__ import annotations

import asyncio
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Callable, Sequence

import grpc
from grpc_health.v1 import _async as aio_health
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC options limiting messages to ``max_message_bytes`` each way (servers and channels)."""
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


# Long-lived internal streams (sessions, expert dispatch) ping, so a peer that vanished without
# closing its connection (node lost, partition) breaks the stream in seconds; servers allow it.
KEEPALIVE_CHANNEL = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000)]
KEEPALIVE_SERVER = [("grpc.http2.min_ping_interval_without_data_ms", 5_000), ("grpc.keepalive_permit_without_calls", 1)]


@dataclass
class GrpcServer:
    """A started server and what its owner needs to advertise and drain it."""

    server: grpc.Server
    port: int
    address: str                     # host:port as bound (the port resolved when 0 was asked)
    health: health.HealthServicer
    health_server: grpc.Server | None = None       # the plaintext health-only server, if any
    health_port: int | None = None

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING (load balancers and probes stop sending); calls still served."""
        self.health.enter_graceful_shutdown()

    def stop(self, grace: float | None = None) -> None:
        """Mark every service NOT_SERVING, then stop; in-flight RPCs get ``grace`` seconds (None: cancelled)."""
        self.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.health_server is not None:
            self.health_server.stop(None).wait()


@dataclass
class AioGrpcServer:
    """A started ``grpc.aio`` server and the event loop (on thread ``thread``) it runs on."""

    server: grpc.aio.Server
    port: int
    address: str
    health: aio_health.HealthServicer
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    service_names: tuple[str, ...] = ()
    health_server: grpc.aio.Server | None = None   # the plaintext health-only server, if any
    health_port: int | None = None

    def enter_graceful_shutdown(self) -> None:
        asyncio.run_coroutine_threadsafe(self.health.enter_graceful_shutdown(), self.loop).result()

    def set_serving(self, serving: bool) -> None:
        """Health of the server ("") and of every service it serves: SERVING or NOT_SERVING."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING

        async def set_all():
            for name in ("", *self.service_names):
                await self.health.set(name, status)

        asyncio.run_coroutine_threadsafe(set_all(), self.loop).result()

    def stop(self, grace: float | None = None) -> None:
        """As ``GrpcServer.stop``, then end the event loop and its thread."""
        self.enter_graceful_shutdown()
        asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result()
        if self.health_server is not None:
            asyncio.run_coroutine_threadsafe(self.health_server.stop(None), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class _CheckOnly(health_pb2_grpc.HealthServicer):
    """``Check`` of ``inner``; ``Watch`` UNIMPLEMENTED (the base class's)."""

    def __init__(self, inner: health.HealthServicer):
        self._inner = inner

    def Check(self, request, context):
        return self._inner.Check(request, context)


class _AioCheckOnly(health_pb2_grpc.HealthServicer):
    """``Check`` of an aio ``inner``; ``Watch`` UNIMPLEMENTED."""

    def __init__(self, inner: aio_health.HealthServicer):
        self._inner = inner

    async def Check(self, request, context):
        return await self._inner.Check(request, context)

    async def Watch(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "only Check is served on the health port")


def start_grpc_server(register: Callable[[grpc.Server], None], service_names: list[str], *,
                      address: str = "127.0.0.1:0", max_workers: int = 64,
                      max_message_bytes: int = 64 << 20, credentials: grpc.ServerCredentials | None = None,
                      interceptors: Sequence[grpc.ServerInterceptor] = (),
                      health_address: str | None = None) -> GrpcServer:
    """Build, bind and start a server; ``register(server)`` adds the caller's servicers.

    ``service_names`` are the full names of those services (``"epserve.v1.ExpertService"``).
    ``credentials`` serves TLS instead of plaintext.
    """
    executor = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc-worker")
    # no SO_REUSEPORT: a second server on a taken port must fail, not silently share it
    server = grpc.server(executor, interceptors=list(interceptors),
                         options=[*channel_options(max_message_bytes), *KEEPALIVE_SERVER, ("grpc.so_reuseport", 0)])
    register(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    # raises RuntimeError when the address can't be bound
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    server.start()
    health_server, health_port = None, None
    if health_address is not None:
        health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="grpc-health"),
                                    options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(_CheckOnly(health_servicer), health_server)
        health_port = health_server.add_insecure_port(health_address)
        health_server.start()
    host = address.rsplit(":", 1)[0]
    return GrpcServer(server, port, f"{host}:{port}", health_servicer, health_server, health_port)


def start_aio_grpc_server(register: Callable[[grpc.aio.Server], None], service_names: list[str], *,
                          address: str = "127.0.0.1:0", max_message_bytes: int = 64 << 20,
                          credentials: grpc.ServerCredentials | None = None,
                          interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                          max_concurrent_rpcs: int | None = None, health_address: str | None = None) -> AioGrpcServer:
    """As ``start_grpc_server``, for a ``grpc.aio`` server on a new event-loop thread; the caller's
    servicers have ``async`` methods and run on that loop (``AioGrpcServer.loop``)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="grpc-aio", daemon=True)
    thread.start()

    async def build() -> tuple[grpc.aio.Server, int, aio_health.HealthServicer, grpc.aio.Server | None, int | None]:
        server = grpc.aio.server(interceptors=list(interceptors), maximum_concurrent_rpcs=max_concurrent_rpcs,
                                 options=[*channel_options(max_message_bytes), *KEEPALIVE_SERVER,
                                          ("grpc.so_reuseport", 0)])
        register(server)
        health_servicer = aio_health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in ["", *service_names]:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        await server.start()
        if health_address is None:
            return server, port, health_servicer, None, None
        health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(_AioCheckOnly(health_servicer), health_server)
        health_port = health_server.add_insecure_port(health_address)
        await health_server.start()
        return server, port, health_servicer, health_server, health_port

    try:
        server, port, health_servicer, health_server, health_port = asyncio.run_coroutine_threadsafe(
            build(), loop).result()
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
        raise
    host = address.rsplit(":", 1)[0]
    return AioGrpcServer(server, port, f"{host}:{port}", health_servicer, loop, thread, tuple(service_names),
                         health_server, health_port)
