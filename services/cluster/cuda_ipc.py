"""CUDA IPC pieces of the local transport on GPUs (``cuda_transport``): a GPU allocation shared with another
process by its IPC handle, and the shard's view of one replica's slots and interprocess events."""
from __future__ import annotations

import torch

OPENED, REFUSED = b"\x01", b"\x00"     # the shard's reply to a GPU hello (REFUSED + the reason)


def gpu_uuid(device: torch.device) -> str:
    """The GPU's UUID: the same GPU under another ordinal in another process (CUDA_VISIBLE_DEVICES)."""
    return str(torch.cuda.get_device_properties(device).uuid)


def _ordinal(uuid: str) -> int:
    """This process's ordinal of the GPU ``uuid``; RuntimeError if it does not see that GPU."""
    for ordinal in range(torch.cuda.device_count()):
        if gpu_uuid(torch.device("cuda", ordinal)) == uuid:
            return ordinal
    raise RuntimeError(f"GPU {uuid} is not visible here ({torch.cuda.device_count()} GPUs seen)")


def _encode(value):
    return {"hex": value.hex()} if isinstance(value, bytes) else value


def _decode(value):
    return bytes.fromhex(value["hex"]) if isinstance(value, dict) else value


def share(memory: torch.Tensor) -> list:
    """A CUDA tensor's storage as JSON-safe IPC arguments (``UntypedStorage._share_cuda_``'s tuple:
    device, handle, size, offset, ref-counter handle and offset, event handle, whether to sync on it)."""
    return [_encode(value) for value in memory.untyped_storage()._share_cuda_()]


def open_shared(description: list, nbytes: int, ordinal: int) -> torch.Tensor:
    """The uint8 [nbytes] tensor over another process's storage that ``share`` described, on this
    process's GPU ``ordinal`` (the sharer's may differ)."""
    args = [_decode(value) for value in description]
    args[0] = ordinal
    torch.cuda._lazy_init()
    storage = torch.UntypedStorage._new_shared_cuda(*args)
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (nbytes,), (1,))


class CudaPeer:
    """The shard's view of one replica's GPU slots and events (``LocalExpertServer`` calls it)."""

    def __init__(self, hello: dict, slot_bytes: int):
        """RuntimeError when this process cannot use them (no CUDA, another GPU, IPC refused)."""
        if not torch.cuda.is_available():
            raise RuntimeError("this shard has no CUDA")
        if hello["nbytes"] % (2 * slot_bytes):
            raise RuntimeError(f"{hello['nbytes']} bytes of slots are not slots of 2 x {slot_bytes} bytes")
        ordinal = _ordinal(hello["gpu"])
        self.device = torch.device("cuda", ordinal)
        self._requests = [torch.cuda.Event.from_ipc_handle(self.device, bytes.fromhex(h)) for h in hello["requests"]]
        self._responses = [torch.cuda.Event.from_ipc_handle(self.device, bytes.fromhex(h))
                           for h in hello["responses"]]
        # the memory last, once nothing else can fail: freeing memory opened by IPC synchronises the device,
        # which a process in sync-debug "error" mode (the GPU tests' shards) turns into an abort
        memory = open_shared(hello["memory"], hello["nbytes"], ordinal)
        self.slots = list(memory.view(-1, 2 * slot_bytes))          # [slots] views [2 x slot_bytes]

    def wait_request(self, slot: int) -> None:
        """Work this thread enqueues from now on runs after the replica's copy into ``slot``."""
        torch.cuda.current_stream(self.device).wait_event(self._requests[slot])

    def answered(self, slot: int) -> None:
        """Mark the end of this thread's work on ``slot`` for the replica to wait on."""
        self._responses[slot].record(torch.cuda.current_stream(self.device))
