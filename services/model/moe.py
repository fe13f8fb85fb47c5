"""DeepSeekMoE: the gate, shared experts, and routed experts behind an expert backend.

The backend is the MoE boundary (SGLang's dispatcher idea): ``dispatch`` hands one MoE layer's
tokens with their top-k choices to wherever the routed experts live and returns a handle;
``combine`` returns, per token, the weighted sum of its routed experts' outputs. The in-process
backend computes in ``dispatch``; a remote backend sends there and waits in ``combine``, so the
shared expert (computed between the two) overlaps the round trip.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from epserve.kernels.fp8 import fp8_weight_dequant
from epserve.kernels.fused_moe import fused_moe
from epserve.kernels.gate_topk import gate_topk
from epserve.services.model.checkpoint import SCALE_SUFFIX, CheckpointReader
from epserve.services.model.config import ModelConfig
from epserve.services.model.layers import MLP

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class Gate(nn.Module):
    """Sigmoid router with the aux-loss-free correction bias and group-limited top-k."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.register_buffer("weight", torch.empty(config.n_routed_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [tokens, hidden] -> topk_weights [tokens, k] float32, topk_ids [tokens, k] int32."""
        c = self.config
        logits = F.linear(x.float(), self.weight.float())                   # [tokens, experts]
        return gate_topk(logits, self.e_score_correction_bias.float(), c.n_group, c.topk_group,
                            c.num_experts_per_tok, c.routed_scaling_factor, c.norm_topk_prob)


@dataclass
class ExpertWeights:
    """Stacked weights of the experts one process holds for one MoE layer (local slot order)."""

    w_gate: torch.Tensor                   # [slots, I, D] model dtype or float8_e4m3fn
    w_up: torch.Tensor                     # [slots, I, D]
    w_down: torch.Tensor                   # [slots, D, I]
    w_gate_scale: torch.Tensor | None = None   # [slots, ceil(I/128), ceil(D/128)] float32 (FP8 only)
    w_up_scale: torch.Tensor | None = None
    w_down_scale: torch.Tensor | None = None

    def run(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_slots: torch.Tensor) -> torch.Tensor:
        """x [tokens, D], weights/slots [tokens, k] (slot -1: not here) -> [tokens, D]."""
        return fused_moe(x, self.w_gate, self.w_up, self.w_down, topk_weights, topk_slots,
                         w_gate_scale=self.w_gate_scale, w_up_scale=self.w_up_scale,
                         w_down_scale=self.w_down_scale)


def expert_tensor_names(layer: int, expert: int, fp8: bool) -> list[str]:
    prefix = f"model.layers.{layer}.mlp.experts.{expert}."
    names = [f"{prefix}{p}.weight" for p in _PROJECTIONS]
    return names + [n + SCALE_SUFFIX for n in names] if fp8 else names


def load_expert_weights(reader: CheckpointReader, layer: int, experts: Sequence[int], *, dtype: torch.dtype,
                        device: torch.device | str, keep_fp8: bool = True) -> ExpertWeights:
    """Read only the listed experts of one layer and stack them in that (slot) order.

    FP8 checkpoints stay FP8 (with block scales) when ``keep_fp8``; otherwise weights are
    dequantised to ``dtype``.
    """
    fp8 = f"model.layers.{layer}.mlp.experts.{experts[0]}.gate_proj.weight{SCALE_SUFFIX}" in reader
    tensors = reader.read([n for e in experts for n in expert_tensor_names(layer, e, fp8)])
    stacked = {}
    for proj in _PROJECTIONS:
        names = [f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" for e in experts]
        weights = [tensors[n] for n in names]
        if fp8 and keep_fp8:
            stacked[proj] = torch.stack(weights).to(device)
            stacked[proj + "_scale"] = torch.stack([tensors[n + SCALE_SUFFIX] for n in names]).float().to(device)
        elif fp8:
            stacked[proj] = torch.stack([fp8_weight_dequant(w, tensors[n + SCALE_SUFFIX], dtype=dtype)
                                         for w, n in zip(weights, names)]).to(device)
        else:
            stacked[proj] = torch.stack(weights).to(device=device, dtype=dtype)
    return ExpertWeights(stacked["gate_proj"], stacked["up_proj"], stacked["down_proj"],
                         stacked.get("gate_proj_scale"), stacked.get("up_proj_scale"),
                         stacked.get("down_proj_scale"))


class ExpertBackend(ABC):
    """Where routed experts run; see the module docstring."""

    @abstractmethod
    def dispatch(self, layer: int, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> Any:
        """Start routed-expert work for x [tokens, D] with logical expert ids [tokens, k]."""

    @abstractmethod
    def combine(self, handle: Any) -> torch.Tensor:
        """The weighted sum of each token's routed experts, [tokens, D] in x's dtype."""


class LocalExperts(ExpertBackend):
    """Every routed expert of every MoE layer in this process (logical id == local slot)."""

    def __init__(self, layers: dict[int, ExpertWeights]):
        self.layers = layers

    @classmethod
    def load(cls, reader: CheckpointReader, config: ModelConfig, layers: Sequence[int], *, dtype: torch.dtype,
             device: torch.device | str, keep_fp8: bool = True) -> "LocalExperts":
        experts = list(range(config.n_routed_experts))
        return cls({layer: load_expert_weights(reader, layer, experts, dtype=dtype, device=device, keep_fp8=keep_fp8)
                    for layer in layers})

    def dispatch(self, layer, x, topk_weights, topk_ids):
        return self.layers[layer].run(x, topk_weights, topk_ids)

    def combine(self, handle):
        return handle


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, backend: ExpertBackend):
        super().__init__()
        self.layer = layer
        self.gate = Gate(config)
        self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
        self.backend = backend

    def start(self, x: torch.Tensor) -> Any:
        """Route and dispatch x [tokens, hidden]; returns the backend's handle."""
        topk_weights, topk_ids = self.gate(x)
        return self.backend.dispatch(self.layer, x, topk_weights, topk_ids)

    def finish(self, x: torch.Tensor, handle: Any) -> torch.Tensor:
        """Shared expert (while the routed experts may still run elsewhere), then combine."""
        shared = self.shared_experts(x)
        return self.backend.combine(handle) + shared
