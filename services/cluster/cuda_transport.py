"""The local transport on GPUs: slots in GPU memory shared by CUDA IPC, ordered by interprocess events.

When the attention replica runs on a GPU and the shard says it does too (``local_cuda`` in its registry
entry), ``ExpertTransport`` opens a ``CudaChannel`` in place of the shared-memory ``LocalChannel``: the
same slots, header and socket, but the slots are one GPU allocation the replica shares with the shard
by its CUDA IPC handle, so activations never leave the GPU. Per slot there are two interprocess CUDA
events, both made by the replica and opened by the shard from their handles::

    replica  copy the batch into slot s (its stream) -> request[s].record -> header -> socket
    shard    header -> its stream waits request[s] -> serve (enqueued, not waited for) -> output into s
             -> response[s].record -> header -> socket
    replica  header -> the sender's stream waits response[s] -> output copied out of s -> s free

Nothing waits on the host: each side only enqueues waits on the other's events. A slot is written
again only after a local ``released`` event recorded behind the output's copy (whatever stream the
next sender uses). The shard answers a header as soon as its work is enqueued; the replica learns the
output's shape from the header, not from the GPU.

Limits, not yet measured on a GPU: both processes must see the GPU of the slots by the same ordinal
(one GPU, or one node's GPUs visible to both); a shard that cannot open the handles closes the
connection, and the channel breaks rather than falling back to host memory. The wait on a response is
enqueued on the sender's stream when the header arrives, so the replica's later work on that stream
(another micro-batch's attention, the shared expert) queues behind the shard's: a copy stream with a
ready event for ``combine`` would keep them overlapping across GPUs.
"""
from __future__ import annotations

import json

import torch

from epserve.services.cluster.cuda_ipc import share
from epserve.services.cluster.expert_channel import TransportStats
from epserve.services.cluster.local_transport import SLOTS, LocalChannel, _view


class CudaChannel(LocalChannel):
    """The replica's end over GPU slots (see the module doc); the rest is ``LocalChannel``'s."""

    ON_DEVICE = True

    def __init__(self, shard: int, name: str, slot_bytes: int, stats: TransportStats, device: torch.device):
        self.device = torch.device(device)
        super().__init__(shard, name, slot_bytes, stats)

    def _setup(self, slot_bytes: int) -> list[torch.Tensor]:
        memory = torch.empty((SLOTS, 2 * slot_bytes), dtype=torch.uint8, device=self.device)
        self._requests = [torch.cuda.Event(interprocess=True) for _ in range(SLOTS)]
        self._responses = [torch.cuda.Event(interprocess=True) for _ in range(SLOTS)]
        self._released = [torch.cuda.Event() for _ in range(SLOTS)]         # the slot's output copied out
        self._streams: list[torch.cuda.Stream | None] = [None] * SLOTS     # the stream that filled each slot
        with torch.cuda.device(self.device):
            hello = {"slot_bytes": slot_bytes, "cuda": {
                "memory": share(memory), "nbytes": memory.numel(),
                "requests": [e.ipc_handle().hex() for e in self._requests],
                "responses": [e.ipc_handle().hex() for e in self._responses]}}
        self._socket.send(json.dumps(hello).encode())
        return list(memory)                                        # [SLOTS] views [2 x slot_bytes]

    def _claim(self, slot: int) -> None:
        torch.cuda.current_stream(self.device).wait_event(self._released[slot])

    def _push(self, slot: int, nbytes: int) -> None:
        stream = torch.cuda.current_stream(self.device)
        self._requests[slot].record(stream)
        self._streams[slot] = stream

    def _take_output(self, slot: int, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        stream = self._streams[slot]
        with torch.cuda.stream(stream):                            # enqueued where the sender's work runs
            stream.wait_event(self._responses[slot])
            out = _view(self._buffers[slot], self.slot_bytes, shape, dtype).clone()
        self._released[slot].record(stream)
        return out

    def _settle(self, slot: int) -> None:
        self._streams[slot].wait_event(self._responses[slot])
        self._released[slot].record(self._streams[slot])
