"""The remote expert backend: routed experts run on expert shards, reached over an ExpertTransport.

``dispatch`` (per MoE layer, per micro-batch)::

    topk_ids [T, K] logical --placement.to_physical--> slots [T, K] --> (shard, local slot)
    per shard touched: rows [R] with >= 1 choice there, local slots [R, K] (-1: elsewhere),
                       weights [R, K], hidden [R, D] (model dtype, or e4m3 + [R, ceil(D/128)] scales)
    -> transport.send(shard, ExpertBatch) for all of them at once -> handle

``combine`` waits for every shard's ``[R, D]`` weighted sum and index-adds it into ``[T, D]``
(float32 accumulation, cast to x's dtype). The model's MoE runs the shared expert between the two,
while the shards work. A new placement version is ``stage``d from any thread and taken
``at_step_boundary`` (the engine loop's thread, between steps).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from epserve.kernels.fp8 import fp8_quant
from epserve.services.cluster.expert_batch import ExpertBatch
from epserve.services.cluster.expert_channel import ExpertShardError
from epserve.services.cluster.placement import Placement
from epserve.services.cluster.transport import ExpertTransport
from epserve.services.metrics import DISPATCH
from epserve.services.model.moe import ExpertBackend

WIRE_DTYPES = ("model", "fp8")
WAIT_SLICE_S = 0.25          # a wait for a shard looks at a staged placement this often


@dataclass
class DispatchStats:
    """What went out, for wire accounting: bytes per token per MoE layer = transport bytes / tokens."""

    layer_calls: int = 0          # dispatch() calls (one per MoE layer per micro-batch)
    tokens: int = 0               # tokens over those calls (a token counts once per layer)
    token_shards: int = 0         # (token, shard) pairs sent: rows over all requests
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, tokens: int, token_shards: int) -> None:
        with self._lock:
            self.layer_calls += 1
            self.tokens += tokens
            self.token_shards += token_shards

    def reset(self) -> None:
        with self._lock:
            self.layer_calls = self.tokens = self.token_shards = 0


@dataclass
class _Handle:
    shape: tuple[int, int]                       # (T, D) of x
    dtype: torch.dtype
    device: torch.device
    parts: list[tuple[int, torch.Tensor, Future]]   # (shard, rows [R] int64 on CPU, future of its output)
    layer: int = -1
    sent_at: float = 0.0                         # time.perf_counter() when the batches went out


class RemoteExperts(ExpertBackend):
    """Routed experts on shards; ``wire_dtype`` "model" sends x as is, "fp8" as e4m3 + 1x128 scales."""

    def __init__(self, placement: Placement, transport: ExpertTransport, *, wire_dtype: str = "model",
                 timeout_s: float | None = 60.0):
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {WIRE_DTYPES}, got {wire_dtype!r}")
        self.placement = placement
        self._staged: Placement | None = None        # the next placement, taken at a step boundary
        self._lock = threading.Lock()
        self.transport = transport
        self.wire_dtype = wire_dtype
        self.timeout_s = timeout_s
        self.stats = DispatchStats()

    def stage(self, placement: Placement) -> None:
        """Use ``placement`` from the next step boundary on (ignored if not newer)."""
        with self._lock:
            self._staged = placement

    def at_step_boundary(self) -> bool:
        """Take the staged placement, if any: the engine loop calls this between steps, so that every
        micro-batch and MoE layer of one step uses one placement version. Whether it switched."""
        with self._lock:
            staged, self._staged = self._staged, None
        if staged is None or staged.version <= self.placement.version:
            return False
        self.placement = staged
        return True

    def dispatch(self, layer: int, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> _Handle:
        """x [T, D], topk_weights [T, K] float32, topk_ids [T, K] logical -> handle for combine."""
        p = self.placement
        slots = p.to_physical(layer, topk_ids).cpu()                       # [T, K] global slot
        shard_of = torch.div(slots, p.slots_per_shard, rounding_mode="floor")
        local = (slots - shard_of * p.slots_per_shard).to(torch.int32)    # [T, K] slot on its shard
        hidden, scales = self._encode(x)                                  # [T, D], [T, G] or None
        shards = torch.unique(shard_of)                                   # [S] shards touched
        here = shard_of[None] == shards[:, None, None]                    # [S, T, K]
        local_by_shard = torch.where(here, local, -1)                     # [S, T, K] (-1: elsewhere)
        weights_by_shard = torch.where(here, topk_weights.float().cpu(), 0.0)
        touched = here.any(dim=2)                                         # [S, T]
        parts = []
        for i, shard in enumerate(shards.tolist()):
            rows = touched[i].nonzero().squeeze(1)                        # [R]
            batch = ExpertBatch(layer, p.version, hidden[rows], None if scales is None else scales[rows],
                                local_by_shard[i, rows], weights_by_shard[i, rows])
            parts.append((shard, rows, self.transport.send(shard, batch)))
        self.stats.add(x.shape[0], sum(len(rows) for _, rows, _ in parts))
        return _Handle((x.shape[0], x.shape[1]), x.dtype, x.device, parts, layer, time.perf_counter())

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [T, D] -> what goes on the wire, on the CPU: (x, None) or (e4m3 [T, D], scales [T, ceil(D/128)])."""
        if self.wire_dtype == "fp8":
            q, scales = fp8_quant(x)                                  # 1 x FP8_BLOCK groups
            return q.cpu(), scales.cpu()
        return x.cpu(), None

    def combine(self, handle: _Handle) -> torch.Tensor:
        """Wait for every shard's rows; their sum per token, [T, D] in x's dtype on x's device."""
        out = torch.zeros(handle.shape, dtype=torch.float32)
        for shard, rows, future in handle.parts:
            output = self._wait(shard, future)                                # [R, D]
            DISPATCH.labels(str(shard), str(handle.layer)).observe(time.perf_counter() - handle.sent_at)
            if tuple(output.shape) != (len(rows), handle.shape[1]):
                raise RuntimeError(f"expert shard {shard} returned output of shape {list(output.shape)}, "
                                   f"expected {[len(rows), handle.shape[1]]}")
            out.index_add_(0, rows, output.float())
        return out.to(device=handle.device, dtype=handle.dtype)

    def _wait(self, shard: int, future: Future) -> torch.Tensor:
        """The shard's output; ExpertShardError at once if a newer placement, staged meanwhile, drops
        the shard (the controller's fail-over of a hung shard: the step runs again on it)."""
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        while True:
            try:
                return future.result(timeout=WAIT_SLICE_S)
            except TimeoutError:
                staged = self._staged
                if staged is not None and shard not in staged.shards_in_use():
                    raise ExpertShardError(shard, "?", f"no response, and placement v{staged.version} "
                                                       f"moved its experts elsewhere") from None
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"expert shard {shard}: no response within {self.timeout_s} s") from None
