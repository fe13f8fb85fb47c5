"""The local transport on GPUs: slots in GPU memory shared by CUDA IPC, ordered by interprocess events.

When the attention replica runs on a GPU and the shard says it does too (``local_cuda`` in its registry
entry), ``ExpertTransport`` opens a ``CudaChannel`` in place of the shared-memory ``LocalChannel``: the
same slots, header and socket, but the slots are one GPU allocation the replica shares with the shard
by its CUDA IPC handle, so activations never leave the GPU. Per slot there are two interprocess CUDA
events, both made by the replica and opened by the shard from their handles::

    replica  copy the batch into slot s (the sender's stream) -> request[s].record -> header -> socket
    shard    header -> its stream waits request[s] -> serve (enqueued, not waited for) -> output into s
             -> response[s].record -> header -> socket
    replica  header -> the transport's copy stream waits response[s] -> output copied out of s
             -> its own ``copied`` event and released[s].record (copy stream) -> s free; ``combine``
             makes its stream wait for that output's ``copied`` (``ExpertTransport.take``) before it reads
             it: not for the whole copy stream, where the next micro-batch's copies may already wait on
             the shards' work for it
    replica  the next batch into s: the sender's stream first waits released[s]

Nothing waits on the host: each side only enqueues waits on the other's events. Output copies run on a
copy stream, so the replica's own work queued meanwhile (another micro-batch's attention, the shared
expert) does not queue behind the shard's. The shard answers a header as soon as its work is enqueued;
the replica learns the output's shape from the header, not from the GPU.

The hello names the GPU by its UUID, so the shard finds it under whatever ordinal it sees it; the shard
replies whether it could open the slots and events, and ``ExpertTransport`` falls back to host-memory
slots (``LocalChannel``) when it could not (another GPU it cannot reach, a CPU shard, no shared IPC
namespace).
"""
from __future__ import annotations

import json

import torch

from epserve.services.cluster.cuda_ipc import OPENED, gpu_uuid, share
from epserve.services.cluster.expert_channel import TransportStats
from epserve.services.cluster.local_transport import SLOTS, LocalChannel

HELLO_TIMEOUT_S = 30.0              # the shard opens the handles (and maybe initialises CUDA) before it replies


class CudaChannel(LocalChannel):
    """The replica's end over GPU slots (see the module doc); the rest is ``LocalChannel``'s."""

    ON_DEVICE = True

    def __init__(self, shard: int, name: str, slot_bytes: int, stats: TransportStats, device: torch.device,
                 copy_stream: torch.cuda.Stream):
        self.device, self._copy_stream = torch.device(device), copy_stream
        super().__init__(shard, name, slot_bytes, stats)

    def _setup(self, slot_bytes: int) -> list[torch.Tensor]:
        try:
            return self._share_slots(slot_bytes)
        except RuntimeError as e:                   # CUDA refused here: the transport falls back to host slots
            raise OSError(f"GPU slots: {e}") from None

    def _share_slots(self, slot_bytes: int) -> list[torch.Tensor]:
        memory = torch.empty((SLOTS, 2 * slot_bytes), dtype=torch.uint8, device=self.device)
        self._requests = [torch.cuda.Event(interprocess=True) for _ in range(SLOTS)]
        self._responses = [torch.cuda.Event(interprocess=True) for _ in range(SLOTS)]
        self._released = [torch.cuda.Event() for _ in range(SLOTS)]         # the slot's output copied out
        with torch.cuda.device(self.device):
            hello = {"slot_bytes": slot_bytes, "cuda": {
                "gpu": gpu_uuid(self.device), "memory": share(memory), "nbytes": memory.numel(),
                "requests": [e.ipc_handle().hex() for e in self._requests],
                "responses": [e.ipc_handle().hex() for e in self._responses]}}
        self._socket.send(json.dumps(hello).encode())
        self._socket.settimeout(HELLO_TIMEOUT_S)
        reply = self._socket.recv(4096)
        self._socket.settimeout(None)
        if reply[:1] != OPENED:
            raise OSError(f"the shard cannot use GPU slots: {reply[1:].decode(errors='replace') or 'no reply'}")
        return list(memory)                                        # [SLOTS] views [2 x slot_bytes]

    def _claim(self, slot: int) -> None:
        torch.cuda.current_stream(self.device).wait_event(self._released[slot])

    def _push(self, slot: int, nbytes: int) -> None:
        self._requests[slot].record(torch.cuda.current_stream(self.device))

    def _take_output(self, slot: int, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(self._responses[slot])
            out = _copy_out(self._views.response(shape, dtype)[slot])
            out.copied = torch.cuda.Event()                 # this copy done: what ExpertTransport.take waits for
            out.copied.record(self._copy_stream)
            self._released[slot].record(self._copy_stream)
        return out

    def _settle(self, slot: int) -> None:
        self._copy_stream.wait_event(self._responses[slot])
        self._released[slot].record(self._copy_stream)


def _copy_out(view: torch.Tensor) -> torch.Tensor:
    """An output copied out of its slot, on the current stream (one function: the protocol test logs it)."""
    return view.clone()
