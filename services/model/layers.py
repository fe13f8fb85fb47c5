"""Small building blocks: RMSNorm, rotary embedding with YaRN, linear layers (FP8-aware), dense MLP.

Weights are buffers (inference only), named as in the HF checkpoint so loading is by name.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from epserve.kernels.fp8_gemm import fp8_linear
from epserve.services.model.config import ModelConfig, RopeConfig, yarn_mscale


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Linear(nn.Module):
    """y = x @ W.T, W in the model dtype or FP8 with 128x128 block scales (``weight_scale_inv``).

    FP8 weights run through the block-scaled FP8 GEMM (``fp8_linear``) when kernels run on Triton;
    otherwise the loader dequantises them once (``fp8_weight_dequant``), since the CPU has no FP8 matmul.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features))
        self.weight_scale_inv: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale_inv is None:
            return F.linear(x, self.weight)
        return fp8_linear(x, self.weight, self.weight_scale_inv)


class Embedding(nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.register_buffer("weight", torch.empty(vocab, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); dense layers and shared experts."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate)
        self.up_proj = Linear(hidden, intermediate)
        self.down_proj = Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RotaryEmbedding:
    """cos/sin tables [max_positions, rope_dim // 2] with YaRN frequency blending and magnitude.

    Matches transformers' ``_compute_yarn_parameters`` (and DeepSeek's ``precompute_freqs_cis``).
    A plain object shared by every attention layer, not a module: it holds no weights.
    """

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu"):
        dim = config.qk_rope_head_dim
        inv_freq, magnitude = rope_frequencies(config.rope, dim)
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]                # [positions, dim // 2]
        self.cos = (freqs.cos() * magnitude).to(device)
        self.sin = (freqs.sin() * magnitude).to(device)
        self.interleaved = config.rope_interleave

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [tokens, heads, dim] (rope part only), positions [tokens] -> rotated x.

        Interleaved checkpoints pair dims (0,1),(2,3)...; the output lists the rotated first
        members then the second members, as transformers does (q and k alike, so dot products
        are unchanged).
        """
        cos = self.cos[positions].to(x.dtype)[:, None, :]             # [tokens, 1, dim // 2]
        sin = self.sin[positions].to(x.dtype)[:, None, :]
        if self.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rope_frequencies(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim // 2] and the cos/sin magnitude (YaRN attention factor)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    pos_freqs = rope.theta ** exponents
    if rope.type != "yarn":
        return 1.0 / pos_freqs, 1.0
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (rope.factor * pos_freqs)
    low, high = _yarn_correction_range(rope, dim)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep_extrapolated = 1 - ramp
    inv_freq = interpolation * (1 - keep_extrapolated) + extrapolation * keep_extrapolated
    magnitude = rope.attention_factor
    if magnitude is None:
        if rope.mscale and rope.mscale_all_dim:
            magnitude = yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
        else:
            magnitude = yarn_mscale(rope.factor)
    return inv_freq, float(magnitude)


def _yarn_correction_range(rope: RopeConfig, dim: int) -> tuple[float, float]:
    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)
