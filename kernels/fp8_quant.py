"""Per-token-group FP8 (e4m3) activation quantisation, DeepSeek-V3 style (1 x group_size scales).

Each row of ``x [M, K]`` is cut into groups of ``group_size`` consecutive columns (the last group
may be partial). Per group::

    scale = max(amax(|x_group|), 1e-10) / 448.0       # float32, 448 = largest finite e4m3 value
    x_q   = clamp(x_group / scale, -448, 448) -> float8_e4m3fn (round to nearest even)

so that ``x ~= x_q.float() * scale[:, k // group_size]``. These are the activation scales that
``epserve.kernels.fp8_gemm`` consumes (``group_size`` = 128 there) and the dispatch wire format.
"""
import os

import torch
import triton
import triton.language as tl

from epserve.kernels.backend import use_triton

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_FLOOR = 1e-10
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TILE_ELEMENTS = 2048  # elements one program quantises: BLOCK_G groups of GS_PAD columns


@triton.jit
def _round_to_e4m3_grid(q):
    """Round float32 ``q`` (|q| <= 448) to the nearest-even e4m3 value, still as float32.

    Only used under the Triton interpreter, whose float32 -> fp8 cast rounds ties away and drops
    the carry when the mantissa rounds up (125.8 -> 64); a value already on the grid casts exactly.
    """
    bits = q.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1                                   # last kept mantissa bit (3 of 23 kept)
    normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)  # -1048576 = 0xFFF00000
    magic = 12582912.0                                       # 1.5 * 2**23: x + magic - magic = rint(x)
    subnormal = ((q * 512.0 + magic) - magic) / 512.0        # e4m3 subnormal step is 2**-9
    subnormal = tl.where(subnormal == 0.0, q * 0.0, subnormal)  # keep the sign of zero
    return tl.where(tl.abs(q) < 0.015625, subnormal, normal)  # 2**-6: smallest normal e4m3


@triton.jit
def per_token_group_quant_fp8_kernel(
    x_ptr, q_ptr, s_ptr,
    K, n_groups,
    stride_xm, stride_qm, stride_sm,
    group_size,
    GS_PAD: tl.constexpr, BLOCK_G: tl.constexpr,
    FP8_MAX_C: tl.constexpr, SCALE_FLOOR_C: tl.constexpr, EMULATE_CAST: tl.constexpr,
):
    """One program quantises BLOCK_G groups of one row."""
    row = tl.program_id(0)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)[:, None]  # [BLOCK_G, 1] group index
    j = tl.arange(0, GS_PAD)[None, :]                                # [1, GS_PAD] column in group
    k = g * group_size + j                                           # [BLOCK_G, GS_PAD] column
    mask = (g < n_groups) & (j < group_size) & (k < K)

    x = tl.load(x_ptr + row * stride_xm + k, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)                                 # [BLOCK_G]
    scale = tl.maximum(amax, SCALE_FLOOR_C) / FP8_MAX_C
    q = x / scale[:, None]
    q = tl.minimum(tl.maximum(q, -FP8_MAX_C), FP8_MAX_C)
    if EMULATE_CAST:
        q = _round_to_e4m3_grid(q)

    tl.store(q_ptr + row * stride_qm + k, q.to(q_ptr.dtype.element_ty), mask=mask)
    g_flat = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    tl.store(s_ptr + row * stride_sm + g_flat, scale, mask=g_flat < n_groups)


def _interpreting(x: torch.Tensor) -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" or not x.is_cuda


def _check_inputs(x: torch.Tensor, group_size: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [M, K], got {getattr(x, 'shape', type(x))}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float32/bfloat16/float16, got {x.dtype}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")


def per_token_group_quant_fp8(x: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: ``x [M, K]`` -> ``(x_q [M, K] float8_e4m3fn, scale [M, ceil(K / group_size)] float32)``."""
    _check_inputs(x, group_size)
    if x.stride(-1) != 1:
        x = x.contiguous()
    M, K = x.shape
    n_groups = triton.cdiv(K, group_size)
    x_q = torch.empty((M, K), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((M, n_groups), dtype=torch.float32, device=x.device)
    if M == 0 or K == 0:
        return x_q, scale
    gs_pad = triton.next_power_of_2(group_size)
    block_g = max(1, min(triton.next_power_of_2(n_groups), _TILE_ELEMENTS // gs_pad))
    grid = (M, triton.cdiv(n_groups, block_g))
    per_token_group_quant_fp8_kernel[grid](
        x, x_q, scale,
        K, n_groups,
        x.stride(0), x_q.stride(0), scale.stride(0),
        group_size,
        GS_PAD=gs_pad, BLOCK_G=block_g,
        FP8_MAX_C=FP8_MAX, SCALE_FLOOR_C=SCALE_FLOOR, EMULATE_CAST=_interpreting(x),
        num_warps=4,
    )
    return x_q, scale


def per_token_group_quant_fp8_reference(x: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch: same contract as :func:`per_token_group_quant_fp8`."""
    _check_inputs(x, group_size)
    M, K = x.shape
    n_groups = -(-K // group_size)
    padded = torch.nn.functional.pad(x.float(), (0, n_groups * group_size - K))  # zeros don't move amax
    groups = padded.view(M, n_groups, group_size)                                 # [M, G, group_size]
    amax = groups.abs().amax(dim=-1, keepdim=True)
    scale = amax.clamp_min(SCALE_FLOOR) / FP8_MAX                                 # [M, G, 1]
    x_q = (groups / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x_q.view(M, n_groups * group_size)[:, :K].contiguous(), scale.squeeze(-1)


def fp8_quant(x: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: Triton when ``use_triton(x)`` else the torch reference."""
    if use_triton(x):
        return per_token_group_quant_fp8(x, group_size)
    return per_token_group_quant_fp8_reference(x, group_size)


def dequant_fp8(x_q: torch.Tensor, scale: torch.Tensor, group_size: int = 128,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`fp8_quant`: ``x_q [M, K]``, ``scale [M, G]`` -> ``[M, K]`` in ``dtype``."""
    K = x_q.shape[-1]
    full = scale.repeat_interleave(group_size, dim=-1)[..., :K]  # [M, K]
    return (x_q.half() * full).to(dtype)  # e4m3 -> float16 is exact and faster than -> float32
