"""The expert shard: the routed experts of one shard's physical slots, for every MoE layer.

It holds the slots of one or more placement versions: the current one, and during a live switch
the next (``hold``, loaded in the background while the current one serves) or the previous (until
every attention replica has moved; ``release``). Only its own experts are read from the checkpoint
(FP8 checkpoints stay FP8), and an expert it already holds in another version is reused, not read
again; an EMPTY slot holds nothing. ``Dispatch`` serves one long-lived stream per attention
replica; per request (one MoE layer of one micro-batch, of one placement version)::

    validate -> hidden [T, D] (model dtype, or e4m3 + scales [T, ceil(D/128)] -> dequantise)
    -> local slots [T, K] -> loaded-weight rows -> fused MoE -> CombineResponse output [T, D]

in request order (``serve(batch)`` is the same for every transport: the local transport's server
calls it on batches in shared memory). A batch the shard cannot serve ends that gRPC stream with
INVALID_ARGUMENT (or FAILED_PRECONDITION for a placement version it does not hold) naming the
field; other streams and new streams are unaffected. Tokens per (version, MoE layer row, local
slot) are counted; a daemon thread hands each version's counts accumulated since the last flush
to ``on_flush(placement, counts)`` every ``flush_interval_s``.

**On a GPU, no host round trip**: a batch whose tensors are on the GPU (the local transport over CUDA
IPC) is served without reading anything back to the host: the range checks that would need a device
sync are not made; instead a choice of a slot out of range or empty is dropped (as a -1) and counted
in ``refused`` on the device, which the flush thread logs. The counts stay on the device too.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
import numpy as np
import torch

from epserve.kernels.fp8 import FP8_BLOCK, FP8_DTYPE, fp8_dequant
from epserve.services.cluster.expert_batch import BadBatch, ExpertBatch, from_request
from epserve.services.cluster.placement import EMPTY, Placement
from epserve.services.cluster.tensor_codec import to_proto
from epserve.services.metrics import PLACEMENT_VERSION
from epserve.services.model.checkpoint import CheckpointReader
from epserve.services.model.config import ModelConfig
from epserve.services.model.moe import ExpertWeights, load_expert_weights
from epserve.services.proto import expert_pb2, expert_pb2_grpc

log = logging.getLogger(__name__)
EMPTY_ROW = -2                  # row_of's entry for an EMPTY slot (-1: a choice of another shard)


def _invalid(field: str, message: str) -> BadBatch:
    return BadBatch(field, message)


@dataclass
class _Held:
    """One placement version's slots on this shard."""

    placement: Placement
    weights: dict[int, ExpertWeights | None]     # MoE layer -> its local experts' stacked weights
    row_of: dict[int, torch.Tensor]               # MoE layer -> [1 + slots_per_shard] weight row of local slot + 1
                                                  #   (index 0, no choice: -1; an EMPTY slot: EMPTY_ROW)
    host_row_of: dict[int, np.ndarray]            # the same on the host (CPU batches)
    tally: torch.Tensor                           # [moe layer rows, 1 + slots_per_shard] int64 choices served per
                                                  #   local slot + 1 (column 0: choices elsewhere), shard's device
    flushed: torch.Tensor                         # [moe layer rows, slots_per_shard]: counts handed to on_flush (CPU)

    def counts(self) -> torch.Tensor:
        """[moe layer rows, slots_per_shard] tokens served per local slot (a copy, still on the device)."""
        return self.tally[:, 1:].clone()


class ExpertShard(expert_pb2_grpc.ExpertServiceServicer):
    def __init__(self, model_path: str | Path, shard_id: int, placement: Placement, *, dtype: torch.dtype,
                 device: str = "cpu", on_flush: Callable[[Placement, torch.Tensor], None] | None = None,
                 flush_interval_s: float = 1.0):
        self.config = ModelConfig.from_hf(model_path)
        self.shard_id, self.dtype, self.device = shard_id, dtype, device
        self.hidden_size = self.config.hidden_size
        self.reader = CheckpointReader(model_path)            # records what was read (selective loading)
        self._held: dict[int, _Held] = {}
        self._retired: dict[tuple[int, int], int] = {}         # (layer, slot) -> tokens of released versions
        self.refused = torch.zeros((), dtype=torch.int64, device=device)   # choices dropped unchecked (GPU)
        self._refused_logged, self._refused_lock = 0, threading.Lock()
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self.hold(placement)
        self.on_flush, self.flush_interval_s = on_flush, flush_interval_s
        self._stop = threading.Event()
        self._flusher = None
        if on_flush is not None:
            self._flusher = threading.Thread(target=self._flush_loop, name=f"shard-{shard_id}-flush", daemon=True)
            self._flusher.start()

    # ---- placement versions ----------------------------------------------------------------------
    @property
    def placement(self) -> Placement:
        """The newest placement version held."""
        with self._lock:
            return self._held[max(self._held)].placement

    def versions(self) -> list[int]:
        with self._lock:
            return sorted(self._held)

    def expert_weights(self, version: int) -> dict[int, ExpertWeights | None]:
        """MoE layer -> the stacked weights of ``version``'s local slots (None where all are EMPTY)."""
        with self._lock:
            return dict(self._held[version].weights)

    def hold(self, placement: Placement) -> None:
        """Load this shard's slots of ``placement`` (reusing experts held for other versions) and serve it."""
        if not 0 <= self.shard_id < placement.num_shards:
            raise ValueError(f"shard_id must be in [0, {placement.num_shards}), got {self.shard_id}")
        if placement.num_experts != self.config.n_routed_experts:
            raise ValueError(f"placement has {placement.num_experts} experts per layer, "
                             f"the model {self.config.n_routed_experts}")
        if placement.version in self.versions():
            return
        weights, row_of, host_row_of = {}, {}, {}
        for layer in placement.moe_layers:
            experts = placement.local_experts(layer, self.shard_id)
            present = [e for e in experts if e != EMPTY]
            weights[layer] = self._stack(layer, present) if present else None
            filled = torch.tensor([e != EMPTY for e in experts])
            rows = torch.where(filled, filled.long().cumsum(0) - 1, EMPTY_ROW)
            host_row_of[layer] = torch.cat([torch.tensor([-1]), rows]).numpy()
            row_of[layer] = torch.from_numpy(host_row_of[layer]).to(self.device)
        shape = (len(placement.moe_layers), placement.slots_per_shard)
        tally = torch.zeros(shape[0], 1 + shape[1], dtype=torch.int64, device=self.device)
        with self._lock:
            self._held[placement.version] = _Held(placement, weights, row_of, host_row_of, tally,
                                                  torch.zeros(shape, dtype=torch.int64))
            PLACEMENT_VERSION.set(max(self._held))

    def _stack(self, layer: int, experts: list[int]) -> ExpertWeights:
        """The stacked weights of ``experts`` (slot order) of ``layer``: rows of held versions where
        this shard has them, the rest read from the checkpoint."""
        with self._lock:
            held = list(self._held.values())
        source: dict[int, tuple[ExpertWeights, int]] = {}           # expert -> (stacked weights, its row)
        for version in held:
            present = [e for e in version.placement.local_experts(layer, self.shard_id) if e != EMPTY]
            if present == experts:
                return version.weights[layer]                      # the same slots: share the tensors
            for row, expert in enumerate(present):
                source.setdefault(expert, (version.weights[layer], row))
        new = [e for e in experts if e not in source]
        if new:
            fresh = load_expert_weights(self.reader, layer, new, dtype=self.dtype, device=self.device)
            source.update({e: (fresh, row) for row, e in enumerate(new)})
        stacked = {}
        for f in dataclasses.fields(ExpertWeights):
            parts = [getattr(source[e][0], f.name) for e in experts]
            stacked[f.name] = None if parts[0] is None else torch.stack(
                [part[source[e][1]] for part, e in zip(parts, experts)])
        return ExpertWeights(**stacked)

    def release(self, version: int) -> None:
        """Stop serving ``version`` and free what only it used (after a last flush of its counts)."""
        if version not in self.versions():
            return
        try:
            self.flush()
        except Exception:                       # noqa: BLE001 - its last counts are lost, not the shard
            log.exception("expert shard %d: flushing counts of v%d failed", self.shard_id, version)
        with self._lock:                        # one hold: a scrape sees the tokens either held or retired
            held = self._held.pop(version, None)
            PLACEMENT_VERSION.set(max(self._held, default=0))
            for key, tokens in ({} if held is None else _per_slot(held.placement, held.counts())).items():
                self._retired[key] = self._retired.get(key, 0) + tokens

    # ---- RPCs ------------------------------------------------------------------------------
    def Dispatch(self, request_iterator, context):
        for request in request_iterator:
            try:
                output = self.serve(from_request(request))
            except BadBatch as e:
                code = grpc.StatusCode.FAILED_PRECONDITION if e.precondition else grpc.StatusCode.INVALID_ARGUMENT
                context.abort(code, f"expert shard {self.shard_id}: {e}")
            yield expert_pb2.CombineResponse(request_id=request.request_id, output=to_proto(output))

    def GetShardInfo(self, request, context):
        """The newest version held, and the tokens each of its slots served."""
        with self._lock:
            held = self._held[max(self._held)]
            counts = held.counts()                    # copied to the host (to_proto) outside the lock
        return expert_pb2.ShardInfo(request_id=request.request_id, shard_id=self.shard_id,
                                    placement_version=held.placement.version,
                                    slots_per_layer=held.placement.slots_per_shard, tokens_per_slot=to_proto(counts))

    # ---- one request -------------------------------------------------------------------------
    def serve(self, batch: ExpertBatch) -> torch.Tensor:
        """Validate and run one batch; its weighted expert sum [T, D] in the model dtype, on the shard's
        device. BadBatch naming the field for a batch the shard cannot serve (see the module doc on GPUs)."""
        held = self._version(batch)
        x, slots, topk_weights = self._decode(held, batch)
        d, row_of = self.device, held.row_of[batch.layer]                        # [1 + slots_per_shard]
        if slots.is_cuda:                                                        # a check would sync: none
            index, rows, any_here = self._rows_unchecked(row_of, slots.to(d))
            self._count(held, batch.layer, index)
        else:                                      # numpy: torch's per-call cost is most of a decode batch's
            index, rows_np, any_here = self._rows_checked(held.host_row_of[batch.layer], slots.numpy(), batch.layer)
            self._count_host(held, batch.layer, index)
            rows = torch.from_numpy(rows_np).to(d)
        weights = held.weights[batch.layer]
        if weights is None or not any_here:
            return torch.zeros(x.shape, dtype=self.dtype, device=d)
        return weights.run(x.to(d), topk_weights.to(d), rows)

    @staticmethod
    def _rows_checked(row_of: np.ndarray, slots: np.ndarray, layer: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """slots [T, K] (range-checked by _decode) -> (index into row_of [T, K], weight rows [T, K] (-1: none),
        whether any choice is here); BadBatch for a choice of an EMPTY slot."""
        index = slots.astype(np.int64) + 1
        rows = row_of[index]
        lowest, highest = (int(rows.min()), int(rows.max())) if rows.size else (-1, -1)
        if lowest == EMPTY_ROW:
            empty = np.flatnonzero(row_of[1:] == EMPTY_ROW).tolist()
            raise _invalid("topk_slots", f"addresses an empty slot of layer {layer} (empty: {empty})")
        return index, rows, highest >= 0

    def _rows_unchecked(self, row_of: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """As ``_rows_checked`` without reading anything back from the device: a choice of a slot out of range
        or EMPTY is dropped (as -1) and added to ``refused``; "any here" is assumed."""
        index = slots.long() + 1
        index = torch.where((index < 0) | (index >= len(row_of)), 0, index)
        rows = row_of[index]                                                     # [T, K] weight row, -1: none
        dropped = (rows == EMPTY_ROW) | ((index == 0) & (slots != -1))
        self.refused += dropped.sum()
        return torch.where(dropped, 0, index), torch.where(dropped, -1, rows), True

    def _version(self, batch: ExpertBatch) -> _Held:
        with self._lock:
            held = self._held.get(batch.placement_version)
            versions = sorted(self._held)
        if held is None:
            raise BadBatch("placement_version", f"request uses placement v{batch.placement_version}, "
                                                f"this shard serves {', '.join(f'v{v}' for v in versions)}",
                           precondition=True)
        return held

    def _decode(self, held: _Held, batch: ExpertBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> hidden [T, D] in the model dtype, local slots [T, K] int32, weights [T, K] float32."""
        placement = held.placement
        if batch.layer not in held.weights:
            raise _invalid("layer", f"{batch.layer} is not a MoE layer of this placement "
                                    f"(MoE layers: {list(placement.moe_layers)})")
        x = batch.hidden
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise _invalid("hidden", f"must be [tokens, {self.hidden_size}], got {list(x.shape)}")
        x = self._dequantise(batch, x)
        slots, weights = batch.topk_slots, batch.topk_weights
        if slots.dtype != torch.int32 or slots.dim() != 2 or slots.shape[0] != x.shape[0]:
            raise _invalid("topk_slots", f"must be int32 [{x.shape[0]}, k], got {slots.dtype} {list(slots.shape)}")
        if weights.dtype != torch.float32 or weights.shape != slots.shape:
            raise _invalid("topk_weights", f"must be float32 {list(slots.shape)}, got {weights.dtype} "
                                           f"{list(weights.shape)}")
        n = placement.slots_per_shard
        if not slots.is_cuda and slots.numel():
            host = slots.numpy()
            lowest, highest = int(host.min()), int(host.max())
            if lowest < -1 or highest >= n:
                raise _invalid("topk_slots", f"values must be in [-1, {n}), got [{lowest}, {highest}]")
        return x, slots, weights

    def _dequantise(self, batch: ExpertBatch, x: torch.Tensor) -> torch.Tensor:
        """hidden in the model dtype, or e4m3 with its scales -> [T, D] in the model dtype."""
        if x.dtype == self.dtype:
            if batch.scales is not None:
                raise _invalid("scales", f"only allowed with float8_e4m3fn hidden, hidden is {x.dtype}")
            return x
        if x.dtype != FP8_DTYPE:
            raise _invalid("hidden", f"dtype must be {self.dtype} or float8_e4m3fn, got {x.dtype}")
        if batch.scales is None:
            raise _invalid("scales", "is required")
        scales = batch.scales
        groups = -(-self.hidden_size // FP8_BLOCK)
        if scales.dtype != torch.float32 or tuple(scales.shape) != (x.shape[0], groups):
            raise _invalid("scales", f"must be float32 [{x.shape[0]}, {groups}] with FP8 hidden, "
                                     f"got {scales.dtype} {list(scales.shape)}")
        return fp8_dequant(x, scales, dtype=self.dtype)

    # ---- load counters -------------------------------------------------------------------------
    def _count(self, held: _Held, layer: int, index: torch.Tensor) -> None:
        """Add the batch's choices (index [T, K]: local slot + 1, 0 for none) to ``held.tally``, on the device."""
        ones = torch.ones((), dtype=torch.int64, device=index.device).expand(index.numel())
        with self._lock:
            held.tally[held.placement.row(layer)].index_add_(0, index.flatten(), ones)

    def _count_host(self, held: _Held, layer: int, index: np.ndarray) -> None:
        """``_count`` for an index [T, K] on the host: numpy's bincount into a CPU tally."""
        if held.tally.is_cuda:
            return self._count(held, layer, torch.from_numpy(index).to(held.tally.device))
        added = np.bincount(index.ravel(), minlength=held.tally.shape[1])
        with self._lock:
            held.tally.numpy()[held.placement.row(layer)] += added

    def token_counts(self, version: int | None = None) -> torch.Tensor:
        """Tokens served per (MoE layer row, local slot) of ``version`` (default: the newest held)
        since it was loaded, [rows, slots_per_shard] int64 (CPU)."""
        with self._lock:
            counts = self._held[max(self._held) if version is None else version].counts()
        return counts.cpu()

    def choices_dropped(self) -> int:
        """Choices of GPU batches dropped unchecked since start (a slot out of range or EMPTY; the metric)."""
        self._log_refused()
        return self._refused_logged

    def tokens_served(self) -> dict[tuple[int, int], int]:
        """(MoE layer, local slot) -> tokens served since start, over every version (the metric)."""
        with self._lock:
            held = [(h.placement, h.counts()) for h in self._held.values()]
            total = dict(self._retired)
        for placement, counts in held:
            for key, tokens in _per_slot(placement, counts).items():
                total[key] = total.get(key, 0) + tokens
        return total

    def flush(self) -> None:
        """Hand each version's counts since its last successful flush to ``on_flush`` (skipped when none)."""
        with self._flush_lock:
            self._log_refused()
            with self._lock:
                held = [(h, h.counts()) for h in self._held.values()]
            held = [(version, counts.cpu()) for version, counts in held]          # outside the lock
            for version, counts in held:                                           # version: a _Held
                delta = counts - version.flushed
                if self.on_flush is None or not delta.any():
                    continue
                self.on_flush(version.placement, delta)
                version.flushed += delta

    def _log_refused(self) -> None:
        with self._refused_lock:
            refused = int(self.refused)
            if refused > self._refused_logged:
                log.warning("expert shard %d: %d choices of GPU batches addressed a slot out of range or empty "
                            "and were dropped (%d in all)", self.shard_id, refused - self._refused_logged, refused)
                self._refused_logged = refused

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            try:
                self.flush()
            except Exception:                   # a flush target that is down: keep counting, retry later
                log.exception("expert shard %d: flushing token counts failed", self.shard_id)

    def close(self) -> None:
        """Stop the flush thread and flush what is left."""
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join()
            self._flusher = None
            try:
                self.flush()
            except Exception:                   # noqa: BLE001 - shutting down must not need Redis
                log.exception("expert shard %d: the last flush of token counts failed", self.shard_id)


def _per_slot(placement: Placement, counts: torch.Tensor) -> dict[tuple[int, int], int]:
    """counts [rows, slots_per_shard] -> {(MoE layer, local slot): tokens} of the non-zero ones."""
    counts = counts.cpu()
    return {(placement.moe_layers[row], slot): int(counts[row, slot]) for row, slot in counts.nonzero().tolist()}
