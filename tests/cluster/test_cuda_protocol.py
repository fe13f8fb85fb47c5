"""The CUDA IPC transport's protocol, run on the CPU against a named fake of CUDA (this machine has no GPU).

``FakeCuda`` stands in for what cannot run here: interprocess events and streams (they log each record and
wait, with the thread that made it) and IPC handles (``share`` / ``open_shared`` hand the same CPU memory to
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

pytestmark = pytest.mark.unit


class FakeCuda:
    """Events, streams and IPC handles of one process, logging ``(thread, "record" | "wait", event)``."""

    def __init__(self):
        self.log: list[tuple[str, str, str]] = []
        self.shared: dict[str, torch.Tensor] = {}
        self.events: dict[bytes, "FakeCuda.Event"] = {}
        self._ids = itertools.count()
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

            def record(self, stream=None):
                fake.log.append((threading.current_thread().name, "record", self.name))

        class Stream:
            def __init__(self, device=None):
                pass

            def wait_event(self, event):
                fake.log.append((threading.current_thread().name, "wait", event.name))

        self.Event, self.Stream = Event, Stream

    def install(self, monkeypatch) -> None:
        for name, value in {"Event": self.Event, "Stream": self.Stream, "is_available": lambda: True,
                            "current_stream": lambda device=None: self.Stream(),
                            "device": lambda device: contextlib.nullcontext(),
                            "stream": lambda stream: contextlib.nullcontext()}.items():
            monkeypatch.setattr(torch.cuda, name, value)
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


def test_every_batch_is_ordered_by_its_slot_s_events(monkeypatch):
    fake = FakeCuda()
    fake.install(monkeypatch)
    served: list[str] = []
    server = LocalExpertServer(_doubling(served), "expert shard 0")
    channel = cuda_transport.CudaChannel(0, server.name, slot_bytes_for(8, 16, 2), TransportStats(),
                                         torch.device("cpu"), torch.cuda.Stream())
    try:
        batches = [ExpertBatch(1, 1, torch.randn(rows, 16), None, torch.zeros(rows, 2, dtype=torch.int32),
                               torch.rand(rows, 2)) for rows in (3, 8, 1, 5, 8, 2)]     # more than SLOTS
        outputs = [channel.send(batch).result(timeout=30) for batch in batches]
    finally:
        channel.close(timeout_s=5)
        server.close()
    assert all(torch.equal(out, batch.hidden * 2) for out, batch in zip(outputs, batches))
    events = {kind: [e.name for e in getattr(channel, f"_{kind}")] for kind in ("requests", "responses", "released")}
    shard = served[0]
    replica = threading.current_thread().name
    reader = next(thread for thread, _, event in fake.log if event in events["released"] and thread != replica)
    for i in range(len(batches)):
        slot = i % SLOTS                                   # one batch at a time: the slots in turn
        expected = [(replica, "wait", events["released"][slot]), (replica, "record", events["requests"][slot]),
                    (shard, "wait", events["requests"][slot]), (shard, "record", events["responses"][slot]),
                    (reader, "wait", events["responses"][slot]), (reader, "record", events["released"][slot])]
        assert fake.log[6 * i:6 * i + 6] == expected, (i, fake.log[6 * i:6 * i + 6])


def test_a_refused_batch_still_waits_for_the_shard_before_its_slot_is_reused(monkeypatch):
    fake = FakeCuda()
    fake.install(monkeypatch)
    server = LocalExpertServer(lambda batch: (_ for _ in ()).throw(ValueError("no")), "expert shard 0")
    channel = cuda_transport.CudaChannel(0, server.name, slot_bytes_for(8, 16, 2), TransportStats(),
                                         torch.device("cpu"), torch.cuda.Stream())
    try:
        future = channel.send(ExpertBatch(1, 1, torch.randn(2, 16), None, torch.zeros(2, 2, dtype=torch.int32),
                                          torch.rand(2, 2)))
        with pytest.raises(Exception, match="internal error: no"):
            future.result(timeout=30)
    finally:
        channel.close(timeout_s=5)
        server.close()
    response, released = channel._responses[0].name, channel._released[0].name
    assert [op for _, op, event in fake.log if event in (response, released)] == ["wait", "record", "wait", "record"]
