"""The attention -> expert-shard data path, behind an interface.

``ExpertTransport.send(shard, DispatchRequest)`` returns a future of that shard's
``CombineResponse``. Production AFD systems move these activations over RDMA/NCCL; this module
ships the gRPC implementation (any network, CPU included): one long-lived bidi ``Dispatch`` stream
per shard, many requests in flight on it, responses matched to requests by order.

Per stream::

    send() --lock--> pending deque (request_id, future) + request queue -> gRPC writer thread
    reader thread: for each response -> pop the oldest pending, check request_id, resolve it

A stream that breaks (shard gone, or the shard rejected a request) fails every pending future with
``ExpertShardError`` naming the shard and its address, and later sends to that shard fail fast
with the same error: the owner decides whether to rebuild the transport.
"""
from __future__ import annotations

import collections
import queue
import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import grpc
from google.protobuf.message import DecodeError

from epserve.services.cluster.grpc_server import KEEPALIVE_CHANNEL, channel_options
from epserve.services.proto import expert_pb2

DISPATCH_METHOD = "/{}/Dispatch".format(expert_pb2.DESCRIPTOR.services_by_name["ExpertService"].full_name)


class ExpertShardError(RuntimeError):
    """The stream to an expert shard broke; ``code`` is the gRPC status when the shard sent one."""

    def __init__(self, shard: int, address: str, reason: str, code: grpc.StatusCode | None = None):
        super().__init__(f"expert shard {shard} at {address}: {reason}")
        self.shard, self.address, self.code = shard, address, code


@dataclass
class TransportStats:
    """Serialised message bytes (protobuf, no HTTP/2 framing) and requests sent, per shard. Thread-safe."""

    bytes_sent: dict[int, int] = field(default_factory=lambda: collections.defaultdict(int))
    bytes_received: dict[int, int] = field(default_factory=lambda: collections.defaultdict(int))
    messages: dict[int, int] = field(default_factory=lambda: collections.defaultdict(int))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_sent(self, shard: int, nbytes: int) -> None:
        with self._lock:
            self.bytes_sent[shard] += nbytes
            self.messages[shard] += 1

    def add_received(self, shard: int, nbytes: int) -> None:
        with self._lock:
            self.bytes_received[shard] += nbytes

    def totals(self) -> tuple[int, int, int]:
        """(bytes sent, bytes received, messages sent) over all shards."""
        with self._lock:
            return sum(self.bytes_sent.values()), sum(self.bytes_received.values()), sum(self.messages.values())

    def reset(self) -> None:
        with self._lock:
            self.bytes_sent.clear()
            self.bytes_received.clear()
            self.messages.clear()


class ExpertTransport(ABC):
    """Sends one (layer, micro-batch) request to one shard; see the module docstring."""

    stats: TransportStats

    @abstractmethod
    def send(self, shard: int, request: expert_pb2.DispatchRequest) -> Future:
        """Queue ``request`` for ``shard``; the future resolves to its ``CombineResponse``."""

    @abstractmethod
    def close(self) -> None:
        """End every stream; later sends fail."""


class _ShardStream:
    """One bidi ``Dispatch`` stream to one shard, with its reader thread."""

    def __init__(self, shard: int, address: str, max_message_bytes: int, stats: TransportStats):
        self.shard, self.address, self.stats = shard, address, stats
        options = [*channel_options(max_message_bytes), *KEEPALIVE_CHANNEL]
        self._channel = grpc.insecure_channel(address, options=options)
        self._requests: queue.SimpleQueue = queue.SimpleQueue()      # serialised requests; None ends
        self._pending: collections.deque[tuple[str, Future]] = collections.deque()
        self._lock = threading.Lock()
        self._error: ExpertShardError | None = None      # set once the stream broke
        self._closed: ExpertShardError | None = None     # set by close(): no new sends
        # bytes in, bytes out: each message is (de)serialised once, here, and its size is known
        dispatch = self._channel.stream_stream(DISPATCH_METHOD, request_serializer=None, response_deserializer=None)
        self._call = dispatch(self._request_iter())
        self._reader = threading.Thread(target=self._read, name=f"expert-stream-{shard}", daemon=True)
        self._reader.start()

    @property
    def broken(self) -> bool:
        """The stream failed (not closed by its owner): sends to it fail until it is replaced."""
        return self._error is not None and self._closed is None

    def _request_iter(self):
        while (request := self._requests.get()) is not None:
            yield request

    def send(self, request: expert_pb2.DispatchRequest) -> Future:
        data = request.SerializeToString()
        future: Future = Future()
        future.set_running_or_notify_cancel()       # running: a caller's cancel() can't race the reader
        with self._lock:                            # one lock: pending order == wire order
            error = self._error or self._closed
            if error is not None:
                future.set_exception(error)
                return future
            self._pending.append((request.request_id, future))
            self._requests.put(data)
        self.stats.add_sent(self.shard, len(data))
        return future

    def _read(self) -> None:
        try:
            for raw in self._call:
                self.stats.add_received(self.shard, len(raw))
                response = expert_pb2.CombineResponse.FromString(raw)
                with self._lock:
                    request_id, future = self._pending.popleft() if self._pending else (None, None)
                if future is None or response.request_id != request_id:
                    self._fail(f"response {response.request_id!r} arrived where {request_id!r} was due")
                    if future is not None:
                        future.set_exception(self._error)
                    return
                future.set_result(response)
            self._fail("transport closed" if self._closed else "the shard ended the stream")
        except grpc.RpcError as e:
            self._fail(f"{e.code().name}: {e.details()}", e.code())
        except DecodeError as e:
            self._fail(f"undecodable CombineResponse: {e}")

    def _fail(self, reason: str, code: grpc.StatusCode | None = None) -> None:
        """Break the stream: record the error, fail what is pending, end the request iterator."""
        with self._lock:
            if self._error is None:
                self._error = ExpertShardError(self.shard, self.address, reason, code)
            error, pending = self._error, list(self._pending)
            self._pending.clear()
        self._requests.put(None)
        self._call.cancel()
        for _, future in pending:
            future.set_exception(error)

    def close(self, timeout_s: float) -> None:
        """Finish the stream after what is in flight (up to ``timeout_s``), then cancel and close."""
        with self._lock:
            self._closed = ExpertShardError(self.shard, self.address, "transport closed")
        self._requests.put(None)
        self._reader.join(timeout_s)
        self._fail("transport closed")
        self._reader.join(timeout_s)
        self._channel.close()


class GrpcExpertTransport(ExpertTransport):
    """The gRPC implementation: one stream per shard in ``addresses`` (shard id -> host:port).

    With ``resolve`` (shard id -> its current address, or None), a send to a shard whose stream
    broke opens a new stream to wherever the shard is now (a restarted shard re-registers, often on
    a new port); what was pending on the broken stream has already failed.
    """

    def __init__(self, addresses: dict[int, str], *, max_message_bytes: int = 64 << 20,
                 resolve: Callable[[int], str | None] | None = None):
        self.addresses = dict(addresses)
        self.stats = TransportStats()
        self._max_message_bytes, self._resolve = max_message_bytes, resolve
        self._lock = threading.Lock()
        self._streams = {shard: _ShardStream(shard, address, max_message_bytes, self.stats)
                         for shard, address in self.addresses.items()}

    def send(self, shard: int, request: expert_pb2.DispatchRequest) -> Future:
        if shard not in self._streams:
            raise KeyError(f"no address for expert shard {shard} (known: {sorted(self._streams)})")
        stream = self._streams[shard]
        if stream.broken and self._resolve is not None:
            stream = self._reconnect(shard)
        return stream.send(request)

    def _reconnect(self, shard: int) -> "_ShardStream":
        with self._lock:
            stream = self._streams[shard]
            address = self._resolve(shard) if stream.broken else None
            if address:
                stream.close(timeout_s=0)
                stream = _ShardStream(shard, address, self._max_message_bytes, self.stats)
                self._streams[shard], self.addresses[shard] = stream, address
            return stream

    def close(self, timeout_s: float = 5.0) -> None:
        for stream in self._streams.values():
            stream.close(timeout_s)
