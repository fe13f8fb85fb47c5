"""The attention -> expert-shard data path: one channel per shard, chosen per (replica, shard) pair.

``ExpertTransport.send(shard, ExpertBatch)`` returns a future of that shard's output ``[R, D]``.
Each shard gets a channel of one of three kinds (``--transport auto|grpc|local|nixl``):

- ``grpc`` (``GrpcChannel``, here): one long-lived bidi ``Dispatch`` stream, the batch as a
  protobuf message; works across any network.
- ``local`` (``local_transport.LocalChannel``): the batch's tensors written into shared-memory
  slots the shard maps, a small header over a Unix socket; both ends on one host. When both ends
  run on GPUs (``device`` here, ``local_cuda`` in the shard's entry) the slots are GPU memory shared
  by CUDA IPC (``cuda_transport.CudaChannel``): activations never leave the GPU.
- ``nixl`` (``nixl_transport.NixlChannel``): the same slots and headers, the bytes moved by NIXL
  one-sided writes between each side's registered slots, headers over TCP; any network.

``auto`` takes ``local`` when the shard registered a local endpoint on this host (``host_id``),
else ``nixl`` when NIXL is installed and the shard offers it, else ``grpc``. A shard advertises
its endpoints in its registry entry (``ShardEndpoint.from_service``); a
restarted shard registers new ones, and a send to a shard whose channel broke opens a new channel
to wherever ``resolve`` says the shard is now (what was pending on the broken one has failed).

Per gRPC stream::

    send() --lock--> pending deque (request_id, future) + request queue -> gRPC writer thread
    reader thread: for each response -> pop the oldest pending, check request_id, resolve it

A stream that breaks (shard gone, or the shard rejected a request) fails every pending future with
``ExpertShardError`` naming the shard and its address, and later sends on it fail fast with the
same error until the transport opens a new channel.
"""
from __future__ import annotations

import collections
import itertools
import logging
import queue
import socket
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from functools import cache
from typing import Callable

import grpc
import torch
from google.protobuf.message import DecodeError

from epserve.services.cluster import cluster_tls
from epserve.services.cluster.cluster_tls import ClusterTls
from epserve.services.cluster.expert_batch import ExpertBatch, to_request
from epserve.services.cluster.expert_channel import ExpertShardError, TransportStats
from epserve.services.cluster.grpc_server import KEEPALIVE_CHANNEL, channel_options
from epserve.services.cluster import nixl_transport
from epserve.services.cluster.cuda_transport import CudaChannel
from epserve.services.cluster.local_transport import LocalChannel
from epserve.services.cluster.registry import ServiceInfo
from epserve.services.cluster.tensor_codec import from_proto
from epserve.services.config import TRANSPORTS
from epserve.services.proto import expert_pb2


log = logging.getLogger(__name__)
DISPATCH_METHOD = "/{}/Dispatch".format(expert_pb2.DESCRIPTOR.services_by_name["ExpertService"].full_name)


@cache
def host_id() -> str:
    """This machine (and boot): two processes with the same id can share memory and Unix sockets."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}/{boot}"


@dataclass(frozen=True)
class ShardEndpoint:
    """Where one expert shard can be reached: its gRPC address, and its local endpoint if it has one."""

    address: str                     # host:port of its gRPC server
    local: str | None = None         # name of its local-transport socket (abstract namespace)
    host: str | None = None          # host_id() of its machine
    nixl: str | None = None          # host:port of its nixl transport's control connection
    local_cuda: bool = False         # its local endpoint takes GPU slots (the shard runs on a GPU)

    @classmethod
    def from_service(cls, service: ServiceInfo) -> "ShardEndpoint":
        info = service.info
        return cls(service.address, info.get("local_endpoint"), info.get("host"), info.get("nixl_endpoint"),
                   bool(info.get("local_cuda", False)))

    def kind(self, mode: str) -> str:
        """The channel kind ``mode`` gives for this shard: "grpc", "local" or "nixl"."""
        if mode not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {mode!r}")
        local = self.local is not None and self.host == host_id()
        nixl = self.nixl is not None and nixl_transport.available()
        if mode == "local" and not local:
            raise ValueError(f"--transport local: expert shard at {self.address} has no local endpoint on this "
                             f"host (its host: {self.host}, this one: {host_id()})")
        if mode == "nixl" and not nixl:
            raise ValueError(f"--transport nixl: expert shard at {self.address} has no nixl endpoint, or NIXL "
                             f"(the nixl-cu12 package) is not installed here")
        if mode == "auto":
            return "local" if local else "nixl" if nixl else "grpc"
        return mode


class GrpcChannel:
    """One bidi ``Dispatch`` stream to one shard, with its reader thread."""

    ON_DEVICE = False                   # outputs arrive in host memory

    def __init__(self, shard: int, address: str, max_message_bytes: int, stats: TransportStats,
                 tls: ClusterTls | None = None):
        self.shard, self.address, self.stats, self.max_message_bytes = shard, address, stats, max_message_bytes
        options = [*channel_options(max_message_bytes), *KEEPALIVE_CHANNEL]
        self._channel = cluster_tls.channel(address, tls, "expert", options)
        self._requests: queue.SimpleQueue = queue.SimpleQueue()      # serialised requests; None ends
        self._pending: collections.deque[tuple[str, Future]] = collections.deque()
        self._ids = itertools.count()
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

    def send(self, batch: ExpertBatch) -> Future:
        """Queue ``batch`` on the stream; ValueError if its message exceeds the channel's limit."""
        request = to_request(batch, f"{batch.layer}:{next(self._ids)}")
        data = request.SerializeToString()
        if len(data) > self.max_message_bytes:
            raise ValueError(f"expert shard {self.shard}: a batch of {batch.rows} tokens is a {len(data)}-byte "
                             f"message; gRPC messages are limited to {self.max_message_bytes} bytes")
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
                try:
                    output = from_proto(response.output)
                except Exception as e:                     # noqa: BLE001 - the stream breaks first, then the batch fails
                    log.exception("%s: decoding the output of %s failed", self.address, request_id)
                    self._fail(f"undecodable output of {request_id}: {e!r}")
                    future.set_exception(self._error)
                    return
                future.set_result(output)
            self._fail("transport closed" if self._closed else "the shard ended the stream")
        except grpc.RpcError as e:
            self._fail(f"{e.code().name}: {e.details()}", e.code())
        except DecodeError as e:
            self._fail(f"undecodable CombineResponse: {e}")
        except Exception as e:                             # noqa: BLE001 - anything else breaks the stream too,
            log.exception("%s: reading a response failed", self.address)     # so that no batch is left waiting
            self._fail(f"reading a response failed: {e!r}")

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


class ExpertTransport:
    """A channel per shard in ``endpoints`` (shard id -> ShardEndpoint), of the kind ``mode`` gives.

    ``resolve`` (shard id -> its current endpoint, or None) lets a send to a shard whose channel
    broke open a new one to wherever the shard is now. Local and nixl channels get
    ``local_slot_bytes`` per slot: a batch that needs more is refused (``ValueError``) before
    anything is sent; so is a gRPC message over ``max_message_bytes``. gRPC channels are mutual TLS
    with ``tls`` (``cluster_tls``). ``device`` is where the replica's activations are: a GPU makes
    local channels to GPU shards ``CudaChannel``s.
    """

    def __init__(self, endpoints: dict[int, ShardEndpoint], *, mode: str = "auto", local_slot_bytes: int = 8 << 20,
                 max_message_bytes: int = 64 << 20, resolve: Callable[[int], ShardEndpoint | None] | None = None,
                 tls: ClusterTls | None = None, device: str | torch.device = "cpu"):
        self.mode, self.stats, self._tls, self.device = mode, TransportStats(), tls, torch.device(device)
        self._copy_stream = None                     # where CudaChannels copy outputs out of their slots
        self._local_slot_bytes, self._max_message_bytes, self._resolve = local_slot_bytes, max_message_bytes, resolve
        self._lock = threading.Lock()
        self.endpoints = dict(endpoints)
        self._channels = {shard: self._open(shard, endpoint) for shard, endpoint in self.endpoints.items()}

    def kind(self, shard: int) -> str:
        """The kind of channel to ``shard``: "grpc", "local", "local-cuda" (GPU slots, ``CudaChannel``) or "nixl"."""
        channel = self._channels.get(shard)
        if channel is not None and channel.ON_DEVICE:
            return "local-cuda"
        return self.endpoints[shard].kind(self.mode)

    def _open(self, shard: int, endpoint: ShardEndpoint):
        kind = endpoint.kind(self.mode)
        if kind == "local" and self.device.type == "cuda" and endpoint.local_cuda:
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream(self.device)
            try:
                return CudaChannel(shard, endpoint.local, self._local_slot_bytes, self.stats, self.device,
                                   self._copy_stream)
            except ExpertShardError as e:
                log.warning("%s; using host-memory slots instead", e)
        if kind == "local":
            return LocalChannel(shard, endpoint.local, self._local_slot_bytes, self.stats)
        if kind == "nixl":
            return nixl_transport.NixlChannel(shard, endpoint.nixl, self._local_slot_bytes, self.stats)
        return GrpcChannel(shard, endpoint.address, self._max_message_bytes, self.stats, self._tls)

    def send(self, shard: int, batch: ExpertBatch) -> Future:
        """Queue ``batch`` for ``shard``; the future resolves to its output [R, D] (on the GPU from a
        ``CudaChannel``, else on the CPU)."""
        channel = self._channels.get(shard)
        if (channel is None or channel.broken) and self._resolve is not None:
            channel = self._reconnect(shard)
        if channel is None:
            raise ExpertShardError(shard, "?", f"no endpoint known (known: {sorted(self._channels)})")
        return channel.send(batch)

    @staticmethod
    def take(output: torch.Tensor) -> torch.Tensor:
        """A future's ``output``, made safe to read on the current stream. A ``CudaChannel``'s output is copied
        out of its slot on the copy stream: this stream waits for that copy (its ``copied`` event; not for the
        whole copy stream, which may hold later micro-batches' copies), and the allocator learns of the use."""
        copied = getattr(output, "copied", None)
        if copied is not None:
            stream = torch.cuda.current_stream(output.device)
            stream.wait_event(copied)
            output.record_stream(stream)
        return output

    def on_device(self) -> bool:
        """Every channel keeps activations on the GPU (``CudaChannel``s): what ``RemoteExperts`` needs to
        skip every host round trip."""
        channels = list(self._channels.values())
        return bool(channels) and all(channel.ON_DEVICE for channel in channels)

    def _reconnect(self, shard: int):
        """Open a channel to where ``resolve`` says ``shard`` is now, in place of a broken one or none
        (a shard a new placement version uses for the first time); the old channel if it says nowhere."""
        with self._lock:
            channel = self._channels.get(shard)
            endpoint = self._resolve(shard) if channel is None or channel.broken else None
            if endpoint:
                new = self._open(shard, endpoint)       # may raise: the broken one stays, the next send retries
                if channel is not None:
                    channel.close(timeout_s=0)
                channel = self._channels[shard] = new
                self.endpoints[shard] = endpoint
            return channel

    def close(self, timeout_s: float = 5.0) -> None:
        for channel in self._channels.values():
            channel.close(timeout_s)
