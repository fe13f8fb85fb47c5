"""The expert shard: the routed experts of one shard's physical slots, for every MoE layer.

At start it reads, per MoE layer of the placement, only the experts in its local slots (FP8
checkpoints stay FP8); an EMPTY slot holds nothing. ``Dispatch`` serves one long-lived stream per
attention replica; per request (one MoE layer of one micro-batch)::

    validate -> hidden [T, D] (model dtype, or e4m3 + scales [T, ceil(D/128)] -> dequantise)
    -> local slots [T, K] -> loaded-weight rows -> fused MoE -> CombineResponse output [T, D]

in request order (``serve(batch)`` is the same for every transport: the local transport's server
calls it on batches in shared memory). A batch the shard cannot serve ends that gRPC stream with
INVALID_ARGUMENT (or FAILED_PRECONDITION for another placement version) naming the field; other
streams and new streams are unaffected. Tokens per (MoE layer row, local slot) are counted; a daemon thread hands
the counts accumulated since the last flush to ``on_flush`` every ``flush_interval_s``.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

import grpc
import torch

from epserve.kernels.fp8 import FP8_BLOCK, FP8_DTYPE, fp8_dequant
from epserve.services.cluster.expert_batch import BadBatch, ExpertBatch, from_request
from epserve.services.cluster.placement import EMPTY, Placement
from epserve.services.cluster.tensor_codec import to_proto
from epserve.services.model.checkpoint import CheckpointReader
from epserve.services.model.config import ModelConfig
from epserve.services.model.moe import ExpertWeights, load_expert_weights
from epserve.services.proto import expert_pb2, expert_pb2_grpc

log = logging.getLogger(__name__)


def _invalid(field: str, message: str) -> BadBatch:
    return BadBatch(field, message)


class ExpertShard(expert_pb2_grpc.ExpertServiceServicer):
    def __init__(self, model_path: str | Path, shard_id: int, placement: Placement, *, dtype: torch.dtype,
                 device: str = "cpu", on_flush: Callable[[torch.Tensor], None] | None = None,
                 flush_interval_s: float = 1.0):
        config = ModelConfig.from_hf(model_path)
        if not 0 <= shard_id < placement.num_shards:
            raise ValueError(f"shard_id must be in [0, {placement.num_shards}), got {shard_id}")
        if placement.num_experts != config.n_routed_experts:
            raise ValueError(f"placement has {placement.num_experts} experts per layer, "
                             f"the model {config.n_routed_experts}")
        self.shard_id, self.placement, self.dtype, self.device = shard_id, placement, dtype, device
        self.hidden_size = config.hidden_size
        self.reader = CheckpointReader(model_path)            # records what was read (selective loading)
        self.weights, self.slot_rows = self._load(self.reader)
        rows, slots = len(placement.moe_layers), placement.slots_per_shard
        self._counts = torch.zeros(rows, slots, dtype=torch.int64)     # [moe layer rows, local slots]
        self._flushed = torch.zeros(rows, slots, dtype=torch.int64)
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self.on_flush, self.flush_interval_s = on_flush, flush_interval_s
        self._stop = threading.Event()
        self._flusher = None
        if on_flush is not None:
            self._flusher = threading.Thread(target=self._flush_loop, name=f"shard-{shard_id}-flush", daemon=True)
            self._flusher.start()

    def _load(self, reader: CheckpointReader) -> tuple[dict[int, ExpertWeights | None], dict[int, torch.Tensor]]:
        """Per MoE layer: the local experts' stacked weights (None if every slot is empty) and
        slot_rows [slots_per_shard] int64, the weight row of each local slot (-1 for EMPTY)."""
        weights, slot_rows = {}, {}
        for layer in self.placement.moe_layers:
            experts = self.placement.local_experts(layer, self.shard_id)
            present = [e for e in experts if e != EMPTY]
            weights[layer] = (load_expert_weights(reader, layer, present, dtype=self.dtype, device=self.device)
                              if present else None)
            filled = torch.tensor([e != EMPTY for e in experts])
            slot_rows[layer] = torch.where(filled, filled.long().cumsum(0) - 1, -1)
        return weights, slot_rows

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
        with self._lock:
            counts = self._counts.clone()
        return expert_pb2.ShardInfo(request_id=request.request_id, shard_id=self.shard_id,
                                    placement_version=self.placement.version,
                                    slots_per_layer=self.placement.slots_per_shard, tokens_per_slot=to_proto(counts))

    # ---- one request -------------------------------------------------------------------------
    def serve(self, batch: ExpertBatch) -> torch.Tensor:
        """Validate and run one batch; its weighted expert sum [T, D] in the model dtype (CPU).
        BadBatch naming the field for a batch the shard cannot serve."""
        x, slots, topk_weights = self._decode(batch)
        layer = batch.layer
        rows = self.slot_rows[layer][slots.long().clamp(min=0)]                  # [T, K] weight row
        rows = torch.where(slots >= 0, rows, -1)
        if (rows[slots >= 0] < 0).any():
            raise _invalid("topk_slots", f"addresses an empty slot of layer {layer} "
                                         f"(empty: {(self.slot_rows[layer] < 0).nonzero().flatten().tolist()})")
        self._count(layer, slots)
        weights = self.weights[layer]
        if weights is None or not (slots >= 0).any():
            return torch.zeros(x.shape, dtype=self.dtype)
        d = self.device
        return weights.run(x.to(d), topk_weights.to(d), rows.to(d)).cpu()

    def _decode(self, batch: ExpertBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> hidden [T, D] in the model dtype, local slots [T, K] int32, weights [T, K] float32."""
        if batch.placement_version != self.placement.version:
            raise BadBatch("placement_version", f"request uses placement v{batch.placement_version}, "
                                                f"this shard serves v{self.placement.version}", precondition=True)
        if batch.layer not in self.weights:
            raise _invalid("layer", f"{batch.layer} is not a MoE layer of this placement "
                                    f"(MoE layers: {list(self.placement.moe_layers)})")
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
        n = self.placement.slots_per_shard
        if slots.numel() and not (slots.min() >= -1 and slots.max() < n):
            raise _invalid("topk_slots", f"values must be in [-1, {n}), got [{int(slots.min())}, {int(slots.max())}]")
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
    def _count(self, layer: int, slots: torch.Tensor) -> None:
        served = torch.bincount(slots[slots >= 0].long(), minlength=self.placement.slots_per_shard)
        with self._lock:
            self._counts[self.placement.row(layer)] += served

    def token_counts(self) -> torch.Tensor:
        """Tokens served per (MoE layer row, local slot) since start, [rows, slots_per_shard] int64."""
        with self._lock:
            return self._counts.clone()

    def flush(self) -> None:
        """Hand the counts since the last successful flush to ``on_flush`` (skipped when none)."""
        with self._flush_lock:
            delta = self.token_counts() - self._flushed
            if self.on_flush is None or not delta.any():
                return
            self.on_flush(delta)
            self._flushed += delta

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
