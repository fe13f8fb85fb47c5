"""The batched, seeded, batch-invariant token sampler.

``sample`` turns one row of logits per sequence into one token id per sequence. Greedy rows take
the argmax; the others are scaled by their temperature, filtered by top-k then top-p (nucleus) and
sampled with the Gumbel-max trick, ``argmax(logits / T - log E)`` with ``E ~ Exp(1)``, which is the
"exponential race" ``argmax(p / E)`` in log space and draws exactly from ``softmax(logits / T)``
restricted to the kept tokens.

The noise is a pure function of ``(seed, step, token id)``: a counter-based splitmix64 hash
evaluated with int64 tensor ops, so a row's draw never depends on the other rows, the batch size or
order, or the vocabulary size, and is the same on every device. A request migrated to another
replica and replayed with the same seed therefore produces the same tokens.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from epserve.services.engine.params import SEED_LIMIT, SamplingParams

_MASK64 = 2**64 - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64 increment (odd)
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_NOISE_CHUNK_ELEMENTS = 1 << 22  # rows x vocab per noise chunk: bounds the int64 temporaries


def sample(
    logits: Tensor, params: Sequence[SamplingParams], seeds: Sequence[int], steps: Sequence[int]
) -> Tensor:
    """Sample one token per row.

    logits: [B, V] float; params/seeds/steps: one per row (``steps[i]`` is the index of the output
    token being generated, 0 for the first). Returns [B] int64 on ``logits.device``.
    """
    _check_sample_args(logits, params, seeds, steps)
    tokens = torch.argmax(logits, dim=-1)  # [B], ties -> lowest id
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    device = logits.device
    row_index = torch.tensor(rows, dtype=torch.long, device=device)
    picked = [params[i] for i in rows]
    temperature = torch.tensor([p.temperature for p in picked], dtype=torch.float32, device=device)
    scaled = _scale(logits.index_select(0, row_index).float(), temperature)  # [b, V]
    if any(p.top_k > 0 or p.top_p < 1 for p in picked):
        top_k = torch.tensor([p.top_k for p in picked], dtype=torch.long, device=device)
        top_p = torch.tensor([p.top_p for p in picked], dtype=torch.float32, device=device)
        scaled = filter_logits(scaled, top_k, top_p)
    keys = [_row_key(seeds[i], steps[i]) for i in rows]
    noise = gumbel_noise(keys, logits.shape[1], device)  # [b, V]
    tokens[row_index] = torch.argmax(scaled + noise, dim=-1)
    return tokens


def filter_logits(scaled: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Apply top-k then top-p per row; removed tokens become -inf.

    scaled: [b, V] float32 temperature-scaled logits; top_k: [b] int64 (0 = disabled);
    top_p: [b] float32 in (0, 1] (1 = disabled). Top-p keeps the smallest set of most probable
    tokens (probabilities renormalised after top-k) whose cumulative probability reaches top_p;
    the most probable token is always kept. Ties are ordered by token id (stable sort).
    """
    vocab = scaled.shape[1]
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True, stable=True)  # [b, V]
    position = torch.arange(vocab, device=scaled.device)  # [V]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))  # [b]
    keep = position[None, :] < k[:, None]  # [b, V] in sorted order
    probs = torch.softmax(sorted_logits.masked_fill(~keep, -math.inf), dim=-1)  # [b, V]
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the strictly better tokens
    keep &= (mass_before < top_p[:, None]) | (top_p[:, None] >= 1)
    keep[:, 0] = True
    keep_by_id = torch.empty_like(keep).scatter_(1, order, keep)  # back to vocabulary order
    return scaled.masked_fill(~keep_by_id, -math.inf)


def gumbel_noise(keys: Sequence[int], vocab: int, device: torch.device | str) -> Tensor:
    """Standard Gumbel noise ``-log(E)``, E ~ Exp(1), as a pure function of (key, token id).

    keys: one 64-bit row key per row (see ``_row_key``). Returns [len(keys), vocab] float32.
    """
    key_tensor = torch.tensor([_to_int64(k) for k in keys], dtype=torch.long, device=device)  # [b]
    token = torch.arange(1, vocab + 1, dtype=torch.long, device=device) * _to_int64(_GOLDEN)  # [V]
    chunk = max(1, _NOISE_CHUNK_ELEMENTS // max(vocab, 1))
    parts = []
    for start in range(0, len(keys), chunk):
        bits = splitmix64_tensor(key_tensor[start : start + chunk, None] + token[None, :])  # [c, V]
        mantissa = _shift_right_logical(bits, 11).double()  # 53 random bits, exact in float64
        uniform = (mantissa + 0.5) * 2.0**-53  # in (0, 1)
        parts.append((-torch.log(-torch.log(uniform))).float())
    return torch.cat(parts, dim=0)


def splitmix64(z: int) -> int:
    """The splitmix64 finalizer on a Python int (64-bit wrap-around)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def splitmix64_tensor(z: Tensor) -> Tensor:
    """The splitmix64 finalizer on an int64 tensor (two's-complement wrap-around), any shape."""
    z = (z ^ _shift_right_logical(z, 30)) * _to_int64(_MIX1)
    z = (z ^ _shift_right_logical(z, 27)) * _to_int64(_MIX2)
    return z ^ _shift_right_logical(z, 31)


def _row_key(seed: int, step: int) -> int:
    """64-bit key of one draw; distinct steps of one seed give distinct keys (bijective mix)."""
    return splitmix64(splitmix64(seed) + step * _GOLDEN)


def _scale(logits: Tensor, temperature: Tensor) -> Tensor:
    """[b, V] logits / T per row, shifted so each row's max is 0 (no overflow for tiny T)."""
    row_max = logits.max(dim=-1, keepdim=True).values
    return (logits - row_max) / temperature[:, None]


def _shift_right_logical(x: Tensor, bits: int) -> Tensor:
    """Unsigned right shift of an int64 tensor (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _to_int64(value: int) -> int:
    """Reinterpret an unsigned 64-bit value as the signed int64 with the same bits."""
    value &= _MASK64
    return value - 2**64 if value >= 2**63 else value


def _check_sample_args(logits: Tensor, params, seeds, steps) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits: expected a float [B, V] tensor, got {tuple(logits.shape)} {logits.dtype}")
    rows = logits.shape[0]
    for name, values in (("params", params), ("seeds", seeds), ("steps", steps)):
        if len(values) != rows:
            raise ValueError(f"{name}: expected {rows} entries (one per logits row), got {len(values)}")
    for seed in seeds:
        if not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"seeds: every seed must be in [0, 2**63), got {seed}")
    for step in steps:
        if step < 0:
            raise ValueError(f"steps: every step must be >= 0, got {step}")
