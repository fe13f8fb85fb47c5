"""The local transport: expert batches in shared memory, a small header over a Unix socket.

For an attention replica and an expert shard on one host. Per (replica, shard) pair the replica
makes ``SLOTS`` slots, each one memfd of 2 x ``slot_bytes`` (the request region, then the response
region), and hands their descriptors to the shard in its hello; both map them for the life of the
connection. Per batch::

    replica  a free slot -> the batch's tensors copied into its request region (no serialisation)
             -> header (seq, slot, layer, placement version, R, D, K, G, hidden dtype) -> socket
    shard    header -> tensor views over the slot -> serve(batch) -> output copied into the
             response region -> header (seq, status, output dtype, error message) -> socket
    replica  header -> output [R, D] copied out of the slot -> slot free -> future resolved

The socket is SOCK_SEQPACKET in Linux's abstract namespace (message boundaries; no file to clean
up): blocking reads, so waiting costs no CPU. An abstract socket has no file mode: any process in the
network namespace may connect, so the shard admits only peers running as its own user (SO_PEERCRED)
and closes other connections before reading a byte. A batch the shard refuses fails its own future with
the shard's message; a connection that ends, or an answer the replica cannot read (a CUDA error copying
it out), breaks the channel and fails every pending batch (the transport then reconnects through the
registry). A replica on a GPU sends GPU slots instead of memfds
(``cuda_transport.CudaChannel``; the server opens them with ``cuda_ipc.CudaPeer``).
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import mmap
import os
import queue
import socket
import struct
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Callable

import grpc
import torch

from epserve.kernels.fp8 import FP8_BLOCK
from epserve.services.cluster.cuda_ipc import OPENED, REFUSED, CudaPeer
from epserve.services.cluster.expert_batch import BadBatch, ExpertBatch
from epserve.services.cluster.expert_channel import ExpertShardError, TransportStats
from epserve.services.cluster.tensor_codec import DTYPES

log = logging.getLogger(__name__)

SLOTS = 4                                   # batches in flight per pair: one per micro-batch (at most 4)
SLOT_WAIT_S = 60.0                          # as RemoteExperts' wait for an answer
_DTYPES = list(DTYPES.values())             # header dtype code -> dtype
_REQUEST = struct.Struct("<QIiqIIIIBB")     # seq, slot, layer, version, rows, hidden, top_k, groups, dtype, scales
_RESPONSE = struct.Struct("<QBB")           # seq, status, output dtype (+ the error message's bytes)
_OK, _BAD, _PRECONDITION, _FAILED = range(4)
_CODES = {_BAD: grpc.StatusCode.INVALID_ARGUMENT, _PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
          _FAILED: grpc.StatusCode.INTERNAL}
_ALIGN = 64


def _region(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes a tensor takes in a slot: its data, rounded up so that the next one starts aligned."""
    return -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN


def _layout(rows: int, hidden: int, top_k: int, groups: int, dtype: torch.dtype, scales: bool):
    """[(name, shape, dtype, offset)] of a batch in a request region, and its size in bytes."""
    parts = [("hidden", (rows, hidden), dtype), ("scales", (rows, groups), torch.float32) if scales else None,
             ("topk_slots", (rows, top_k), torch.int32), ("topk_weights", (rows, top_k), torch.float32)]
    layout, offset = [], 0
    for name, shape, kind in filter(None, parts):
        layout.append((name, shape, kind, offset))
        offset += _region(shape, kind)
    return layout, offset


def slot_bytes_for(tokens: int, hidden: int, top_k: int) -> int:
    """Slot size for batches of up to ``tokens`` rows (float32 hidden and output: the widest)."""
    groups = -(-hidden // FP8_BLOCK)
    return max(_layout(tokens, hidden, top_k, groups, torch.float32, True)[1], _region((tokens, hidden), torch.float32))


def _view(buffer: torch.Tensor, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The ``shape`` ``dtype`` tensor at byte ``offset`` of a slot buffer (a view: no copy)."""
    nbytes = _region(shape, dtype)
    return buffer[offset:offset + nbytes].view(dtype)[:math.prod(shape)].view(shape)


class SlotViews:
    """Tensor views over one connection's slots, made once per batch layout (for every slot) and then
    reused: making a batch's views takes ~16 torch calls, which at decode sizes cost more on the CPU
    than the copies themselves. Both ends of a pair keep one."""

    LIMIT = 1024                    # layouts kept (batch sizes vary); past it the cache starts over

    def __init__(self, buffers: list[torch.Tensor], slot_bytes: int):
        self.buffers, self.slot_bytes = buffers, slot_bytes             # [SLOTS] uint8 [2 x slot_bytes]
        self._cache: dict[tuple, tuple] = {}

    def request(self, rows: int, hidden: int, top_k: int, groups: int, dtype: torch.dtype,
                scales: bool) -> tuple[list[dict[str, torch.Tensor]] | None, int]:
        """(per slot, {name: view} of a batch's tensors in its request region; None if they do not fit,
        their bytes)."""
        key = (rows, hidden, top_k, groups, dtype, scales)
        found = self._cache.get(key)
        if found is None:
            layout, size = _layout(rows, hidden, top_k, groups, dtype, scales)
            views = None if size > self.slot_bytes else [
                {name: _view(buffer, offset, shape, kind) for name, shape, kind, offset in layout}
                for buffer in self.buffers]
            found = self._keep(key, (views, size))
        return found

    def response(self, shape: tuple[int, int], dtype: torch.dtype) -> list[torch.Tensor] | None:
        """Per slot, the view of an output in its response region (None if it does not fit)."""
        key = (shape, dtype)
        found = self._cache.get(key)
        if found is None:
            fits = self.output_fits(shape, dtype)
            found = self._keep(key, ([_view(b, self.slot_bytes, shape, dtype) for b in self.buffers] if fits else None,))
        return found[0]

    def output_fits(self, shape: tuple[int, int], dtype: torch.dtype) -> bool:
        """Whether an output fits a slot's response region (no views made)."""
        return _region(shape, dtype) <= self.slot_bytes

    def _keep(self, key: tuple, value: tuple) -> tuple:
        if len(self._cache) >= self.LIMIT:
            self._cache = {}
        self._cache[key] = value
        return value


class LocalChannel:
    """The replica's end of one pair: slots, the socket, a reader thread resolving futures by seq."""

    KIND = "local"
    ON_DEVICE = False                       # whether outputs stay on the GPU (cuda_transport.CudaChannel)

    def __init__(self, shard: int, name: str, slot_bytes: int, stats: TransportStats):
        slot_bytes = -(-slot_bytes // _ALIGN) * _ALIGN                 # the response region starts aligned
        self.shard, self.address, self.slot_bytes, self.stats = shard, f"{self.KIND}:{name}", slot_bytes, stats
        self._socket = self._connect(name)
        try:
            self._views = SlotViews(self._setup(slot_bytes), slot_bytes)
        except OSError as e:
            self._socket.close()
            raise ExpertShardError(shard, self.address, f"hello failed: {e}") from None
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(SLOTS):
            self._free.put(i)
        self._pending: dict[int, tuple[Future, int, tuple[int, int]]] = {}   # seq -> (future, slot, [R, D])
        self._seq, self._lock = itertools.count(), threading.Lock()
        self._error: ExpertShardError | None = None
        self._closed = False
        self._reader = threading.Thread(target=self._read, name=f"{self.KIND}-expert-{shard}", daemon=True)
        self._reader.start()

    # ---- what a transport over other wires replaces (nixl_transport) ------------------------------
    def _connect(self, name: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect("\0" + name)
        except OSError as e:
            sock.close()
            raise ExpertShardError(self.shard, self.address, f"cannot connect: {e}") from None
        return sock

    def _setup(self, slot_bytes: int) -> list[torch.Tensor]:
        """The slots, shared with the shard: memfds mapped here, their descriptors sent in the hello."""
        fds = [os.memfd_create(f"epserve-slot-{self.shard}-{i}", os.MFD_CLOEXEC) for i in range(SLOTS)]
        try:
            for fd in fds:
                os.ftruncate(fd, 2 * slot_bytes)
            buffers = [torch.frombuffer(mmap.mmap(fd, 2 * slot_bytes), dtype=torch.uint8) for fd in fds]
            socket.send_fds(self._socket, [json.dumps({"slot_bytes": slot_bytes}).encode()], fds)
        finally:
            for fd in fds:
                os.close(fd)                        # the mappings (and the shard's copies) keep the memory
        return buffers

    def _claim(self, slot: int) -> None:
        """Before writing into ``slot`` again: its last output has been copied out (shared memory: it has)."""

    def _push(self, slot: int, nbytes: int) -> None:
        """Make the first ``nbytes`` of ``slot``'s request region visible to the shard (shared: nothing to do)."""

    def _take_output(self, slot: int, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """The shard's output, copied out of ``slot``'s response region (the slot is then free)."""
        return self._views.response(shape, dtype)[slot].clone()

    def _settle(self, slot: int) -> None:
        """The shard is done with ``slot`` after refusing its batch (shared memory: it is, at its answer)."""

    def _send_message(self, data: bytes) -> None:
        self._socket.send(data)

    def _receive_message(self) -> bytes:
        return self._socket.recv(65536)

    @property
    def broken(self) -> bool:
        """The connection failed (not closed by its owner): sends fail until the channel is replaced."""
        return self._error is not None and not self._closed

    def send(self, batch: ExpertBatch) -> Future:
        """Copy ``batch`` into a free slot and tell the shard; ValueError if it does not fit a slot."""
        groups = batch.scales.shape[1] if batch.scales is not None else 0
        rows, hidden, top_k = batch.rows, batch.hidden.shape[1], batch.topk_slots.shape[1]
        views, size = self._views.request(rows, hidden, top_k, groups, batch.hidden.dtype, batch.scales is not None)
        if views is None or not self._views.output_fits((rows, hidden), torch.float32):    # the widest output
            needed = max(size, _region((rows, hidden), torch.float32))
            raise ValueError(f"expert shard {self.shard}: a batch of {rows} tokens x {hidden} needs {needed} bytes; "
                             f"the local transport's slots hold {self.slot_bytes} (sized for the engine's "
                             f"max_num_batched_tokens)")
        future: Future = Future()
        future.set_running_or_notify_cancel()
        slot = self._take_slot()
        if slot is None:
            future.set_exception(self._error)
            return future
        self._claim(slot)
        for name, view in views[slot].items():
            view.copy_(getattr(batch, name))
        self._push(slot, size)
        with self._lock:
            if self._error is not None:
                future.set_exception(self._error)
                return future
            seq = next(self._seq)
            self._pending[seq] = (future, slot, (rows, hidden))
            try:
                self._send_message(_REQUEST.pack(seq, slot, batch.layer, batch.placement_version, rows, hidden,
                                                 top_k, groups, _DTYPES.index(batch.hidden.dtype),
                                                 batch.scales is not None))
            except OSError as e:                                 # the shard is going: this batch fails
                del self._pending[seq]
                self._free.put(slot)
                future.set_exception(ExpertShardError(self.shard, self.address, f"send failed: {e}"))
                return future
        self.stats.add_sent(self.shard, size + _REQUEST.size)
        return future

    def _take_slot(self) -> int | None:
        """A free slot, waiting while every slot is in flight; None once the channel has failed. A shard
        that holds every slot for ``SLOT_WAIT_S`` (hung, yet its socket open) breaks the channel."""
        deadline = time.monotonic() + SLOT_WAIT_S
        while self._error is None:
            try:
                return self._free.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() > deadline:
                    self._fail(f"no slot came back for {SLOT_WAIT_S:.0f} s: the shard is not answering")
        return None

    def _read(self) -> None:
        """Resolve each answer's future until the connection ends. Anything unexpected on the way (a CUDA error
        copying an output out of its slot, no memory, NIXL's progress failing) breaks the channel as a lost
        connection does: the channel is broken first, then the answer's batch and every pending one fail."""
        while True:
            try:
                message = self._receive_message()
            except OSError as e:
                return self._fail(f"connection lost: {e}")
            except Exception as e:                                  # noqa: BLE001 - see the docstring
                log.exception("%s: receiving an answer failed", self.address)
                return self._fail(f"receiving an answer failed: {e!r}")
            if not message:
                return self._fail("transport closed" if self._closed else "the shard closed the connection")
            if self._resolve_answer(message):
                return

    def _resolve_answer(self, message: bytes) -> bool:
        """Resolve the future of the batch ``message`` answers; True when the answer broke the channel (a
        malformed one, or one that cannot be read: the channel is broken first, then that batch fails)."""
        try:
            seq, status, out_dtype = _RESPONSE.unpack_from(message)
        except struct.error:
            self._fail(f"a malformed response of {len(message)} bytes")
            return True
        with self._lock:
            entry = self._pending.pop(seq, None)
        if (status != _OK and status not in _CODES) or out_dtype >= len(_DTYPES) or entry is None:
            problem = f"a malformed response to batch {seq} (status {status}, dtype {out_dtype})"
        elif status == _OK and self._views.response(entry[2], _DTYPES[out_dtype]) is None:
            problem = f"the response to batch {seq} ({_DTYPES[out_dtype]}) overflows its slot"
        else:
            try:
                self._deliver(*entry, status, out_dtype, message)
                return False
            except Exception as e:                                  # noqa: BLE001 - see _read
                log.exception("%s: reading the answer to batch %d failed", self.address, seq)
                problem = f"reading the answer to batch {seq} failed: {e!r}"
        self._fail(problem)                                         # broken before anyone learns of the failure
        if entry is not None:
            entry[0].set_exception(self._error)
        return True

    def _deliver(self, future: Future, slot: int, shape: tuple[int, int], status: int, out_dtype: int,
                 message: bytes) -> None:
        """The batch's output (copied out of ``slot``) or the shard's refusal to its future; the slot free."""
        if status == _OK:
            out = self._take_output(slot, shape, _DTYPES[out_dtype])
            self.stats.add_received(self.shard, out.nbytes + _RESPONSE.size)
            self._free.put(slot)
            future.set_result(out)
            return
        self._settle(slot)
        self._free.put(slot)
        future.set_exception(ExpertShardError(self.shard, self.address,
                                              message[_RESPONSE.size:].decode(errors="replace"), _CODES[status]))

    def _fail(self, reason: str) -> None:
        with self._lock:
            if self._error is None:
                self._error = ExpertShardError(self.shard, self.address, reason)
            error, pending = self._error, list(self._pending.values())
            self._pending.clear()
        for future, _, _ in pending:
            future.set_exception(error)

    def close(self, timeout_s: float) -> None:
        """End the connection; what is pending fails with "transport closed"."""
        self._closed = True
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reader.join(timeout_s)
        self._socket.close()


class LocalExpertServer:
    """The shard's end: a listening socket, a thread per connected replica calling ``serve`` per batch."""

    def __init__(self, serve: Callable[[ExpertBatch], torch.Tensor], label: str):
        self.serve, self.label = serve, label                         # label: "expert shard N" in messages
        self._socket, self.name = self._listen()
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name=f"local-server-{label}", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return                                                # closed
            if not self._admits(connection):
                connection.close()
                continue
            with self._lock:
                self._connections.append(connection)
            threading.Thread(target=self._serve_connection, args=(connection,), daemon=True,
                             name=f"local-conn-{self.label}").start()

    def _admits(self, connection: socket.socket) -> bool:
        """A Unix-socket peer must run as this process's user (TCP peers of nixl_transport: see its docs)."""
        if connection.family != socket.AF_UNIX:
            return True
        _pid, uid, _gid = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                   struct.calcsize("3i")))
        if uid != os.getuid():
            log.warning("%s: refused a local connection from uid %d (not this process's user)", self.label, uid)
        return uid == os.getuid()

    # ---- what a transport over other wires replaces (nixl_transport) ------------------------------
    def _listen(self) -> tuple[socket.socket, str]:
        name = f"epserve-{uuid.uuid4().hex}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.bind("\0" + name)
        sock.listen(64)
        return sock, name

    def _handshake(self, connection: socket.socket):
        """The replica's hello -> (its slots as this side sees them, slot_bytes, what _push_output needs):
        memfds mapped here, or GPU slots opened by their CUDA IPC handles (``cuda_transport``)."""
        hello, fds, _, _ = socket.recv_fds(connection, 16384, SLOTS)
        hello = json.loads(hello)
        slot_bytes = hello["slot_bytes"]
        try:
            if "cuda" in hello:
                try:
                    peer = CudaPeer(hello["cuda"], slot_bytes)
                except Exception as e:                              # noqa: BLE001 - said to the replica
                    connection.send(REFUSED + str(e).encode()[:2048])
                    raise RuntimeError(f"GPU slots refused: {e}") from None
                connection.send(OPENED)
                return peer.slots, slot_bytes, peer
            return [torch.frombuffer(mmap.mmap(fd, 2 * slot_bytes), dtype=torch.uint8) for fd in fds], slot_bytes, None
        finally:
            for fd in fds:
                os.close(fd)

    def _push_output(self, peer, slot: int, slot_bytes: int, nbytes: int) -> None:
        """Make the output in ``slot``'s response region visible to the replica (shared: nothing to do)."""

    def _connection_closed(self, connection: socket.socket) -> None:
        """What a connection held beyond its socket is released (shared memory: the unmapping is GC's)."""

    def _send_message(self, connection: socket.socket, data: bytes) -> None:
        connection.send(data)

    def _receive_message(self, connection: socket.socket) -> bytes:
        return connection.recv(65536)

    # ---- serving -----------------------------------------------------------------------------
    def _serve_connection(self, connection: socket.socket) -> None:
        try:
            buffers, slot_bytes, peer = self._handshake(connection)
            views = SlotViews(buffers, slot_bytes)
            while header := self._receive_message(connection):
                response, nbytes = self._answer(header, views, peer)
                if nbytes:
                    self._push_output(peer, _REQUEST.unpack_from(header)[1], slot_bytes, nbytes)
                self._send_message(connection, response)
        except (OSError, ValueError, KeyError, struct.error, RuntimeError) as e:   # a replica gone, a malformed
            log.info("%s: connection ended: %s", self.label, e)                  # message, a CUDA handle refused
        finally:
            self._connection_closed(connection)
            with self._lock:
                self._connections.remove(connection)
            connection.close()

    def _answer(self, header: bytes, views: SlotViews, peer: object = None) -> tuple[bytes, int]:
        """One batch from its header and slot -> (the response header, the output's bytes in the slot). With
        GPU slots (a ``CudaPeer``) the work is ordered after the replica's writes and before its reads by
        CUDA IPC events, not by waiting here."""
        seq, slot, layer, version, rows, hidden, top_k, groups, dtype, scales = _REQUEST.unpack(header)
        cuda = isinstance(peer, CudaPeer)
        try:
            if slot >= len(views.buffers) or dtype >= len(_DTYPES):
                raise BadBatch("header", f"slot {slot} or dtype code {dtype} out of range")
            if cuda:
                peer.wait_request(slot)
            in_slots, size = views.request(rows, hidden, top_k, groups, _DTYPES[dtype], bool(scales))
            if in_slots is None:
                raise BadBatch("hidden", f"a batch of {rows} x {hidden} needs {size} bytes, "
                                         f"the slot has {views.slot_bytes}")
            batch = in_slots[slot]
            out = self.serve(ExpertBatch(layer, version, batch["hidden"], batch.get("scales"),
                                         batch["topk_slots"], batch["topk_weights"]))
            out_slots = views.response(tuple(out.shape), out.dtype)
            if out_slots is None:
                raise BadBatch("hidden", f"the output of {rows} x {hidden} does not fit the slot")
            out_slots[slot].copy_(out)
            return _RESPONSE.pack(seq, _OK, _DTYPES.index(out.dtype)), _region(tuple(out.shape), out.dtype)
        except BadBatch as e:
            status = _PRECONDITION if e.precondition else _BAD
            return _RESPONSE.pack(seq, status, 0) + f"{self.label}: {e}".encode(), 0
        except Exception as e:                                         # noqa: BLE001 - answer, keep serving
            log.exception("%s: a batch failed", self.label)
            return _RESPONSE.pack(seq, _FAILED, 0) + f"{self.label}: internal error: {e}".encode(), 0
        finally:
            if cuda and slot < len(views.buffers):
                peer.answered(slot)                    # the replica reads or reuses the slot after this

    def close(self) -> None:
        """Stop accepting and end every connection (their replicas see the channel break)."""
        try:
            self._socket.shutdown(socket.SHUT_RDWR)                  # wakes accept(); close alone does not
        except OSError:
            pass
        self._socket.close()
        with self._lock:
            for connection in self._connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
