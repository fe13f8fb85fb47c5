"""The CUDA IPC transport's protocol, run on the CPU against a named fake of CUDA (this machine has no GPU).

``FakeCuda`` stands in for what cannot run here: interprocess events and streams (they log each record,
wait and copy out of a slot, with the thread and the stream) and IPC handles (``share`` / ``open_shared`` hand the same CPU memory to
the other side, in one process). Everything else is the real code: ``CudaChannel`` against a real
``LocalExpertServer`` over its Unix socket, ``CudaPeer`` opening the hello. The GPU tests
(``test_cuda_transport.py``) check the same on a GPU; this one checks, wherever CI runs, that the hello,
the reply, the slots and the order of every event record and wait are what the module doc says.
"""
from __future__ import annotations

import contextlib
import itertools
import threading

import pytest
import torch

from epserve.services.cluster import cuda_ipc, cuda_transport
from epserve.services.cluster.expert_batch import ExpertBatch
from epserve.services.cluster.expert_channel import TransportStats
from epserve.services.cluster.local_transport import SLOTS, LocalExpertServer, slot_bytes_for
from epserve.services.cluster.transport import ExpertTransport

pytestmark = pytest.mark.unit


class FakeCuda:
    """Events, streams and IPC handles of one process; logs ``(thread, stream, "record" | "wait" | "copy", what)``
    (a copy out of a slot is logged by ``cuda_transport._copy_out``, on the stream current at the time)."""

    def __init__(self):
        self.log: list[tuple[str, str, str, str]] = []
        self.shared: dict[str, torch.Tensor] = {}
        self.events: dict[bytes, "FakeCuda.Event"] = {}
        self._ids = itertools.count()
        self._current = threading.local()                     # the stream a torch.cuda.stream(...) block set
        fake = self

        class Event:
            def __init__(self, interprocess: bool = False):
                self.name = f"event{next(fake._ids)}"

            def ipc_handle(self) -> bytes:
                fake.events[self.name.encode()] = self
                return self.name.encode()

            @staticmethod
            def from_ipc_handle(device, handle: bytes):
                return fake.events[handle]

            def record(self, stream):
                fake.note(stream, "record", self.name)

        class Stream:
            def __init__(self, device=None, name: str | None = None):
                self.name = name or f"stream{next(fake._ids)}"

            def wait_event(self, event):
                fake.note(self, "wait", event.name)

        self.Event, self.Stream = Event, Stream

    def note(self, stream, op: str, what: str) -> None:
        self.log.append((threading.current_thread().name, stream.name, op, what))

    def current_stream(self, device=None):
        stream = getattr(self._current, "stream", None)
        return stream or self.Stream(name=f"default:{threading.current_thread().name}")

    @contextlib.contextmanager
    def stream(self, stream):
        before, self._current.stream = getattr(self._current, "stream", None), stream
        try:
            yield
        finally:
            self._current.stream = before

    def install(self, monkeypatch) -> None:
        for name, value in {"Event": self.Event, "Stream": self.Stream, "is_available": lambda: True,
                            "current_stream": self.current_stream, "stream": self.stream,
                            "device": lambda device: contextlib.nullcontext()}.items():
            monkeypatch.setattr(torch.cuda, name, value)
        copy_out = cuda_transport._copy_out

        def logged_copy_out(view):
            self.note(self.current_stream(), "copy", "output")
            return copy_out(view)

        monkeypatch.setattr(cuda_transport, "_copy_out", logged_copy_out)
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: self.note(stream, "use", "output"))
        monkeypatch.setattr(cuda_transport, "share", self.share)
        monkeypatch.setattr(cuda_transport, "gpu_uuid", lambda device: "GPU-fake")
        monkeypatch.setattr(cuda_ipc, "open_shared", lambda description, nbytes, ordinal: self.shared[description])
        monkeypatch.setattr(cuda_ipc, "_ordinal", lambda uuid: 0)

    def share(self, memory: torch.Tensor) -> str:
        self.shared["memory"] = memory.view(-1)
        return "memory"


def _doubling(seen: list[str]):
    def serve(batch: ExpertBatch) -> torch.Tensor:
        seen.append(threading.current_thread().name)
        return batch.hidden * 2
    return serve


def _channel(fake: FakeCuda, server: LocalExpertServer) -> cuda_transport.CudaChannel:
    return cuda_transport.CudaChannel(0, server.name, slot_bytes_for(8, 16, 2), TransportStats(),
                                      torch.device("cpu"), fake.Stream(name="copy"))


def test_every_batch_is_ordered_by_its_slot_s_events(monkeypatch):
    fake = FakeCuda()
    fake.install(monkeypatch)
    served: list[str] = []
    server = LocalExpertServer(_doubling(served), "expert shard 0")
    channel = _channel(fake, server)
    try:
        batches = [ExpertBatch(1, 1, torch.randn(rows, 16), None, torch.zeros(rows, 2, dtype=torch.int32),
                               torch.rand(rows, 2)) for rows in (3, 8, 1, 5, 8, 2)]     # more than SLOTS
        outputs = [channel.send(batch).result(timeout=30) for batch in batches]
    finally:
        channel.close(timeout_s=5)
        server.close()
    assert all(torch.equal(out, batch.hidden * 2) for out, batch in zip(outputs, batches))
    events = {kind: [e.name for e in getattr(channel, f"_{kind}")] for kind in ("requests", "responses", "released")}
    replica, shard = threading.current_thread().name, served[0]
    reader = next(thread for thread, _, op, _ in fake.log if op == "copy")
    for i in range(len(batches)):
        s = i % SLOTS                                      # one batch at a time: the slots in turn
        expected = [(replica, f"default:{replica}", "wait", events["released"][s]),      # slot's last copy done
                    (replica, f"default:{replica}", "record", events["requests"][s]),    # after the batch's copy in
                    (shard, f"default:{shard}", "wait", events["requests"][s]),
                    (shard, f"default:{shard}", "record", events["responses"][s]),       # after the output is in
                    (reader, "copy", "wait", events["responses"][s]),                    # then, on the copy stream:
                    (reader, "copy", "copy", "output"),                                  # the output copied out,
                    (reader, "copy", "record", outputs[i].copied.name),                  # its own event
                    (reader, "copy", "record", events["released"][s])]                  # and the slot released
        assert fake.log[8 * i:8 * i + 8] == expected, (i, fake.log[8 * i:8 * i + 8])


def test_combine_waits_for_its_own_output_s_copy_not_for_the_next_micro_batch_s(monkeypatch):
    """Both micro-batches' outputs are queued on the copy stream as soon as their headers come (a shard answers
    once its work is enqueued); reading the first must not wait on the copy stream's tail, where the second's
    copy waits for the shard's work on it: that would undo the overlap of two micro-batches."""
    fake = FakeCuda()
    fake.install(monkeypatch)
    server = LocalExpertServer(_doubling([]), "expert shard 0")
    channel = _channel(fake, server)
    try:
        futures = [channel.send(ExpertBatch(1, 1, torch.randn(rows, 16), None, torch.zeros(rows, 2, dtype=torch.int32),
                                            torch.rand(rows, 2))) for rows in (3, 5)]
        first, second = (future.result(timeout=30) for future in futures)
    finally:
        channel.close(timeout_s=5)
        server.close()
    before = len(fake.log)
    assert ExpertTransport.take(first) is first
    replica = threading.current_thread().name
    assert fake.log[before:] == [(replica, f"default:{replica}", "wait", first.copied.name),
                                 (replica, f"default:{replica}", "use", "output")]
    assert first.copied.name != second.copied.name


def test_a_refused_batch_still_waits_for_the_shard_before_its_slot_is_reused(monkeypatch):
    fake = FakeCuda()
    fake.install(monkeypatch)
    server = LocalExpertServer(lambda batch: (_ for _ in ()).throw(ValueError("no")), "expert shard 0")
    channel = _channel(fake, server)
    try:
        future = channel.send(ExpertBatch(1, 1, torch.randn(2, 16), None, torch.zeros(2, 2, dtype=torch.int32),
                                          torch.rand(2, 2)))
        with pytest.raises(Exception, match="internal error: no"):
            future.result(timeout=30)
    finally:
        channel.close(timeout_s=5)
        server.close()
    response, released = channel._responses[0].name, channel._released[0].name
    assert [(stream, op) for _, stream, op, event in fake.log if event in (response, released)] == [
        ("default:MainThread", "wait"), ("default:local-conn-expert shard 0", "record"), ("copy", "wait"),
        ("copy", "record")]


def test_a_hello_the_shard_cannot_use_opens_no_ipc_memory(monkeypatch):
    """Memory opened by CUDA IPC synchronises the device when it is freed, which the GPU tests' shards (in
    sync-debug "error" mode) turn into an abort: ``CudaPeer`` checks the hello and opens the events first."""
    fake = FakeCuda()
    fake.install(monkeypatch)
    opened = []
    monkeypatch.setattr(cuda_ipc, "open_shared", lambda *args: opened.append(args))

    def refuse(device, handle):
        raise RuntimeError("no such event")

    monkeypatch.setattr(fake.Event, "from_ipc_handle", staticmethod(refuse))
    hello = {"gpu": "GPU-fake", "memory": "memory", "requests": ["00"], "responses": ["00"]}
    with pytest.raises(RuntimeError, match="not slots of 2 x 32 bytes"):
        cuda_ipc.CudaPeer({**hello, "nbytes": 100}, 32)
    with pytest.raises(RuntimeError, match="no such event"):
        cuda_ipc.CudaPeer({**hello, "nbytes": 4 * 64}, 32)
    assert opened == []
