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

**Without a host round trip** (``sync_free``; the default when x is on a GPU and every channel keeps
it there, ``ExpertTransport.on_device``): which rows touch which shard is a fact on the device, and
learning it on the host (``nonzero``, ``.cpu()``) would stall the host on the GPU once per MoE layer.
So every shard of the placement gets all ``T`` rows, its local slots ``[T, K]`` being -1 where a
choice is elsewhere: the rows, slots and weights stay on the device (the local transport over CUDA
IPC carries them GPU to GPU) and the shard's fused MoE skips the -1 choices. It moves
``S / (shards a token touches)`` times the rows of the sparse dispatch: right for a few shards on one
node, which is where device-resident transport runs today.

**A shard that fails or straggles**: when a shard's stream breaks, its part of the micro-batch is sent at
once to other copies of the same experts (redundant slots of the same placement version), and the shard
is avoided for ``AVOID_S`` (dispatch moves its choices to other copies too). When it has not answered
within ``hedge_after_s``, its part is also sent to other copies, whichever answers first is used, and the
shard is avoided the same way.
Either needs a copy elsewhere for every choice of the part; otherwise the part waits (a straggler) or
fails the step (a dead shard: the engine runs the step again once the controller has re-placed).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch

from epserve.kernels.fp8 import fp8_quant
from epserve.services.cluster.expert_batch import ExpertBatch
from epserve.services.cluster.expert_channel import ExpertShardError
from epserve.services.cluster.placement import EMPTY, Placement
from epserve.services.cluster.transport import ExpertTransport
from epserve.services.metrics import DISPATCH, REROUTED
from epserve.services.model.moe import ExpertBackend

WIRE_DTYPES = ("model", "fp8")
WAIT_SLICE_S = 0.25          # a wait for a shard looks at a staged placement this often
AVOID_S = 3.0                # a shard that failed or straggled gets no choice with a copy elsewhere for this long
# a broken stream (None: no status) or an unreachable shard: its part is worth sending elsewhere; a refusal is not
RESENDABLE = (None, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass
class DispatchStats:
    """What went out, for wire accounting: bytes per token per MoE layer = transport bytes / tokens."""

    layer_calls: int = 0          # dispatch() calls (one per MoE layer per micro-batch)
    tokens: int = 0               # tokens over those calls (a token counts once per layer)
    token_shards: int = 0         # (token, shard) pairs sent: rows over all requests, re-sent ones included
    rerouted: int = 0             # of those, rows sent again to other copies (a failed or straggling shard)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, tokens: int, token_shards: int) -> None:
        with self._lock:
            self.layer_calls += 1
            self.tokens += tokens
            self.token_shards += token_shards

    def add_rerouted(self, rows: int) -> None:
        with self._lock:
            self.token_shards += rows
            self.rerouted += rows

    def reset(self) -> None:
        with self._lock:
            self.layer_calls = self.tokens = self.token_shards = self.rerouted = 0


@dataclass
class _Wire:
    """One micro-batch of one MoE layer as it went out (on x's device when sync-free, else the CPU),
    kept so that a shard's part can be re-sent."""

    placement: Placement
    layer: int
    topk_ids: torch.Tensor                       # [T, K] logical
    slots: torch.Tensor                          # [T, K] global physical slot of each choice
    weights: torch.Tensor                        # [T, K] float32
    hidden: torch.Tensor                         # [T, D] model dtype or e4m3
    scales: torch.Tensor | None                  # [T, ceil(D/128)] with e4m3


@dataclass
class _Handle:
    shape: tuple[int, int]                       # (T, D) of x
    dtype: torch.dtype
    device: torch.device
    parts: list[tuple[int, torch.Tensor, Future]]   # (shard, rows [R] int64 on the wire's device, future of its output)
    wire: _Wire
    sent_at: float = 0.0                         # time.monotonic() when the batches went out


class _Straggling(Exception):
    """A shard has not answered within hedge_after_s."""


class RemoteExperts(ExpertBackend):
    """Routed experts on shards; ``wire_dtype`` "model" sends x as is, "fp8" as e4m3 + 1x128 scales."""

    def __init__(self, placement: Placement, transport: ExpertTransport, *, wire_dtype: str = "model",
                 timeout_s: float | None = 60.0, hedge_after_s: float | None = None, sync_free: bool | None = None):
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {WIRE_DTYPES}, got {wire_dtype!r}")
        self.placement = placement
        self._staged: Placement | None = None        # the next placement, taken at a step boundary
        self._lock = threading.Lock()
        self.transport = transport
        self.wire_dtype = wire_dtype
        self.timeout_s = timeout_s
        self.hedge_after_s = hedge_after_s or None              # 0 / None: never hedge
        self.sync_free = sync_free                               # None: on a GPU over CudaChannels (module doc)
        self.stats = DispatchStats()
        self._avoided: dict[int, float] = {}                     # shard -> time.monotonic() it failed or straggled
        self._unanswered: dict[int, list[Future]] = {}           # shard -> batches it straggled on, answered elsewhere

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
        sync_free = x.is_cuda and self.transport.on_device() if self.sync_free is None else self.sync_free
        device = x.device if sync_free else torch.device("cpu")
        ids = topk_ids.to(device)
        slots = p.to_physical(layer, ids)                                 # [T, K] global slot
        avoided = self._avoided_shards()
        if avoided:                                                       # a copy elsewhere where there is one
            elsewhere = _other_copies(p, layer, ids, slots, avoided)
            slots = torch.where(elsewhere >= 0, elsewhere, slots)
        hidden, scales = self._encode(x, device)                          # [T, D], [T, G] or None
        wire = _Wire(p, layer, ids, slots, topk_weights.float().to(device), hidden, scales)
        parts = self._send_all_rows(wire, slots, avoided) if sync_free else self._send(wire, slots)
        self.stats.add(x.shape[0], sum(len(rows) for _, rows, _ in parts))
        return _Handle((x.shape[0], x.shape[1]), x.dtype, x.device, parts, wire, time.monotonic())

    def _send_all_rows(self, wire: _Wire, slots: torch.Tensor, avoided: list[int]) -> list[tuple]:
        """Every row to every shard of the placement, with -1 for the choices elsewhere: nothing about the
        routing is read on the host -> (shard, rows [T] (all), future) per shard. An avoided shard is left
        out where the placement has a copy elsewhere of each of its experts (dispatch moved its choices)."""
        p = wire.placement
        left_out = _replaceable(p, wire.layer, avoided) if avoided else ()
        shard_of = torch.div(slots, p.slots_per_shard, rounding_mode="floor")     # [T, K]
        local = (slots - shard_of * p.slots_per_shard).to(torch.int32)            # [T, K] slot on its shard
        everyone = torch.arange(slots.shape[0], device=slots.device)              # [T]
        parts = []
        for shard in p.shards_in_use():
            if shard in left_out:
                continue
            here = shard_of == shard
            batch = ExpertBatch(wire.layer, p.version, wire.hidden, wire.scales, torch.where(here, local, -1),
                                torch.where(here, wire.weights, 0.0))
            parts.append((shard, everyone, self._send_one(shard, batch)))
        return parts

    def _send(self, wire: _Wire, slots: torch.Tensor, rows: torch.Tensor | None = None) -> list[tuple]:
        """One ExpertBatch per shard that ``slots`` [R, K] (-1: a choice not sent now) touches, for the
        micro-batch's ``rows`` [R] (None: all of them) -> (shard, its rows of the micro-batch [R'], future).
        The split is numpy's, on the host: at decode sizes torch's per-call cost is most of a layer's dispatch.
        (A sync-free wire is on the GPU: only a re-send after a failure comes here with it, and may sync.)"""
        p, device = wire.placement, wire.hidden.device
        slots_np = slots.cpu().numpy()
        shard_of = slots_np // p.slots_per_shard                                # [R, K], -1 for -1
        local = (slots_np - shard_of * p.slots_per_shard).astype(np.int32)      # [R, K] slot on its shard
        weights = (wire.weights if rows is None else wire.weights[rows]).detach().cpu().numpy()
        parts = []
        for shard in np.unique(shard_of).tolist():
            if shard < 0:
                continue
            here = shard_of == shard                                            # [R, K]
            picked = here.any(axis=1).nonzero()[0]                              # [R'] rows with a choice there
            every = rows is None and len(picked) == len(slots_np)
            picked_rows = torch.from_numpy(picked).to(device)
            mine = picked_rows if rows is None else rows[picked_rows]
            batch = ExpertBatch(wire.layer, p.version, wire.hidden if every else wire.hidden[mine],
                                None if wire.scales is None else wire.scales if every else wire.scales[mine],
                                torch.from_numpy(np.where(here, local, np.int32(-1))[picked]).to(device),
                                torch.from_numpy(np.where(here, weights, np.float32(0))[picked]).to(device))
            parts.append((shard, mine, self._send_one(shard, batch)))
        return parts

    def _send_one(self, shard: int, batch: ExpertBatch) -> Future:
        """The transport's future, or one that holds its ExpertShardError (a shard it cannot reach now)."""
        try:
            return self.transport.send(shard, batch)
        except ExpertShardError as error:
            failed: Future = Future()
            failed.set_exception(error)
            return failed

    def _encode(self, x: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [T, D] -> what goes on the wire, on ``device``: (x, None) or (e4m3 [T, D], scales [T, ceil(D/128)])."""
        if self.wire_dtype == "fp8":
            q, scales = fp8_quant(x)                                  # 1 x FP8_BLOCK groups
            return q.to(device), scales.to(device)
        return x.to(device), None

    def combine(self, handle: _Handle) -> torch.Tensor:
        """Wait for every shard's rows; their sum per token, [T, D] in x's dtype on x's device (float32
        accumulation where the wire is, then one copy to x's device)."""
        device = handle.wire.hidden.device
        out = torch.zeros(handle.shape, dtype=torch.float32, device=device)
        for shard, rows, future in handle.parts:
            for done_rows, output in self._collect(handle, shard, rows, future):
                out.index_add_(0, done_rows, self.transport.take(output).to(device, torch.float32))
        return out.to(device=handle.device, dtype=handle.dtype)

    def _collect(self, handle: _Handle, shard: int, rows: torch.Tensor, future: Future) -> list[tuple]:
        """[(rows [R], output [R, D])] of one shard's part: its own answer, or the answers of other copies of its
        experts when its stream broke or it straggled past ``hedge_after_s`` (whichever answered first)."""
        deadline = None if self.timeout_s is None else handle.sent_at + self.timeout_s    # from the send
        hedge_at = None if self.hedge_after_s is None else handle.sent_at + self.hedge_after_s
        if hedge_at is not None and shard in self._avoided_shards():
            hedge_at = handle.sent_at                 # sent before the shard straggled on another part: at once
        try:
            answers = [(rows, self._wait(shard, future, deadline, hedge_at))]
        except ExpertShardError as error:
            if error.code not in RESENDABLE:
                raise
            self._avoided[shard] = time.monotonic()
            again = self._resend(handle.wire, shard, rows, "failed")
            if again is None:
                raise
            answers = [(r, self._wait(s, f, deadline)) for s, r, f in again]
        except _Straggling:
            again = self._resend(handle.wire, shard, rows, "straggling")
            if again is None:
                answers = [(rows, self._wait(shard, future, deadline))]
            else:                                   # the next layers go around it too, not into its queue
                self._avoided[shard] = time.monotonic()
                answers = self._first_of(shard, rows, future, again, deadline)
                if not future.done():
                    self._unanswered.setdefault(shard, []).append(future)
        DISPATCH.labels(str(shard), str(handle.wire.layer)).observe(time.monotonic() - handle.sent_at)
        for answered_rows, output in answers:
            if tuple(output.shape) != (len(answered_rows), handle.shape[1]):
                raise RuntimeError(f"expert shard {shard} returned output of shape {list(output.shape)}, "
                                   f"expected {[len(answered_rows), handle.shape[1]]}")
        return answers

    def _resend(self, wire: _Wire, shard: int, rows: torch.Tensor, reason: str):
        """Send ``shard``'s choices of ``rows`` [R] to other copies of their experts -> parts as ``_send``
        gives them, or None when some choice has no copy elsewhere."""
        slots = wire.slots[rows]                                                # [R, K]
        on_shard = torch.div(slots, wire.placement.slots_per_shard, rounding_mode="floor") == shard
        elsewhere = _other_copies(wire.placement, wire.layer, wire.topk_ids[rows], slots,
                                  sorted({shard, *self._avoided_shards()}))
        if bool((elsewhere[on_shard] < 0).any()):
            return None
        parts = self._send(wire, torch.where(on_shard, elsewhere, -1), rows)
        sent = sum(len(r) for _, r, _ in parts)
        self.stats.add_rerouted(sent)
        REROUTED.labels(reason).inc(sent)
        return parts

    def _first_of(self, shard: int, rows: torch.Tensor, future: Future, again: list, deadline: float | None) -> list:
        """The straggler's answer or all of ``again``'s, whichever is complete first (the other is dropped);
        the straggler's when a re-sent part fails."""
        others = [f for _, _, f in again]
        while True:
            if future.done() and future.exception() is None:
                return [(rows, future.result())]
            if all(f.done() for f in others):
                if all(f.exception() is None for f in others):
                    return [(r, f.result()) for _, r, f in again]
                return [(rows, self._wait(shard, future, deadline))]
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"expert shard {shard} and the other copies: no response within {self.timeout_s} s")
            wait([f for f in (future, *others) if not f.done()], timeout=WAIT_SLICE_S, return_when=FIRST_COMPLETED)

    def _avoided_shards(self) -> list[int]:
        """Shards that failed or straggled in the last AVOID_S seconds, or that still owe an answer they
        straggled on (each holds one of the transport's slots for that shard until it comes)."""
        if not self._avoided:
            return []
        now = time.monotonic()
        for shard, futures in list(self._unanswered.items()):
            if all(f.done() for f in futures):
                del self._unanswered[shard]
        for shard in [s for s, at in self._avoided.items() if now - at > AVOID_S and s not in self._unanswered]:
            self._avoided.pop(shard, None)
        return sorted(self._avoided)

    def _wait(self, shard: int, future: Future, deadline: float | None, hedge_at: float | None = None) -> torch.Tensor:
        """The shard's output; _Straggling after ``hedge_at``; ExpertShardError at once if a newer placement,
        staged meanwhile, drops the shard (the controller's fail-over of a hung shard: the step runs again)."""
        while True:
            slice_s = WAIT_SLICE_S if hedge_at is None else min(WAIT_SLICE_S, max(0.0, hedge_at - time.monotonic()))
            try:
                return future.result(timeout=slice_s)
            except TimeoutError:
                staged = self._staged
                if staged is not None and shard not in staged.shards_in_use():
                    raise ExpertShardError(shard, "?", f"no response, and placement v{staged.version} "
                                                       f"moved its experts elsewhere") from None
                if hedge_at is not None and time.monotonic() >= hedge_at:
                    raise _Straggling() from None
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"expert shard {shard}: no response within {self.timeout_s} s") from None


def _other_copies(p: Placement, layer: int, topk_ids: torch.Tensor, slots: torch.Tensor, avoid: list[int]) -> torch.Tensor:
    """slots [N, K] -> [N, K]: for each choice on a shard in ``avoid``, the first copy of its expert on a shard
    not in ``avoid`` (-1 where there is none); -1 for every other choice."""
    sps = p.slots_per_shard
    copies = p.tables_on(slots.device)[0][p.row(layer)][topk_ids.long()]     # [N, K, M] slots, EMPTY padded
    usable = (copies != EMPTY) & ~_on_shards(torch.div(copies, sps, rounding_mode="floor"), avoid)
    first = copies.gather(2, usable.int().argmax(dim=2, keepdim=True)).squeeze(2)  # [N, K]
    moved = _on_shards(torch.div(slots, sps, rounding_mode="floor"), avoid)
    return torch.where(moved & usable.any(dim=2), first, -1)


def _on_shards(shard_of: torch.Tensor, shards: list[int]) -> torch.Tensor:
    """shard_of [...] == any of ``shards``, compared with Python ints (a tensor of them would be a blocking
    host-to-device copy on a GPU)."""
    hit = torch.zeros_like(shard_of, dtype=torch.bool)
    for shard in shards:
        hit |= shard_of == shard
    return hit


def _replaceable(p: Placement, layer: int, avoid: list[int]) -> set[int]:
    """The shards of ``avoid`` each of whose experts of ``layer`` has a copy on a shard not in ``avoid``
    (from the placement alone: nothing read from the device)."""
    row = p.row(layer)
    copies = p.logical_to_physical[row]                                        # [E, M] slots, EMPTY padded
    shard_of_copy = torch.div(copies, p.slots_per_shard, rounding_mode="floor")
    elsewhere = ((copies != EMPTY) & ~_on_shards(shard_of_copy, avoid)).any(dim=1)           # [E]
    members = p.members()[row]                                                 # [S, slots] expert, EMPTY
    return {s for s in avoid if bool(elsewhere[members[s][members[s] != EMPTY]].all())}
