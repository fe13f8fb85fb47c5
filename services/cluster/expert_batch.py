"""One (MoE layer, micro-batch) of work for one expert shard, as tensors: what every transport carries.

    ExpertBatch(layer, placement_version,
                hidden       [R, D]  model dtype, or float8_e4m3fn with
                scales       [R, ceil(D/128)] float32 (None otherwise),
                topk_slots   [R, K]  int32: the shard's local slot of each choice, -1 where elsewhere,
                topk_weights [R, K]  float32)
    -> the shard's answer: output [R, D] in the model dtype, the weighted sum of its experts.

The gRPC transport turns a batch into a ``DispatchRequest`` and back (``to_request`` /
``from_request``); the local transport writes its tensors into shared-memory slots and reads them
there, with no serialisation. Both end in the shard's ``serve(batch)``, which validates it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from epserve.services.cluster.tensor_codec import from_proto, to_proto
from epserve.services.proto import expert_pb2


class BadBatch(ValueError):
    """A batch the shard refuses; ``field`` names the part, ``precondition`` marks another placement version."""

    def __init__(self, field: str, message: str, precondition: bool = False):
        super().__init__(f"{field}: {message}")
        self.field, self.precondition = field, precondition


@dataclass
class ExpertBatch:
    layer: int
    placement_version: int
    hidden: torch.Tensor                     # [R, D]
    scales: torch.Tensor | None              # [R, ceil(D/128)] float32 with FP8 hidden
    topk_slots: torch.Tensor                 # [R, K] int32, -1: another shard's
    topk_weights: torch.Tensor               # [R, K] float32

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]


def to_request(batch: ExpertBatch, request_id: str) -> expert_pb2.DispatchRequest:
    request = expert_pb2.DispatchRequest(
        request_id=request_id, layer=batch.layer, placement_version=batch.placement_version,
        hidden=to_proto(batch.hidden), topk_slots=to_proto(batch.topk_slots), topk_weights=to_proto(batch.topk_weights))
    if batch.scales is not None:
        request.scales.CopyFrom(to_proto(batch.scales))
    return request


def from_request(request: expert_pb2.DispatchRequest) -> ExpertBatch:
    """The batch of a ``DispatchRequest``; BadBatch naming the field when a tensor is missing or malformed."""
    return ExpertBatch(request.layer, request.placement_version, _tensor(request, "hidden"),
                       _tensor(request, "scales") if request.HasField("scales") else None,
                       _tensor(request, "topk_slots"), _tensor(request, "topk_weights"))


def _tensor(request, name: str) -> torch.Tensor:
    if not request.HasField(name):
        raise BadBatch(name, "is required")
    try:
        return from_proto(getattr(request, name))
    except ValueError as e:
        raise BadBatch(name, str(e)) from None
