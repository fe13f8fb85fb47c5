"""The FP8 block format of DeepSeek-V3: float8_e4m3fn values with one float32 scale per block.

::

    activations  x [M, K] -> x_q [M, K] e4m3, scale [M, ceil(K/128)]              1 x 128 groups
                 x[m, k] = x_q[m, k] * scale[m, k // 128]
    weights      w [N, K] -> w_q [N, K] e4m3, scale [ceil(N/128), ceil(K/128)]    128 x 128 blocks
                 w[n, k] = w_q[n, k] * scale[n // 128, k // 128]    (the checkpoints' ``weight_scale_inv``)

where ``128`` is ``FP8_BLOCK`` (activation groups may be narrower: ``group_size``), the last group
or block of a row or column may be partial, and dequantisation multiplies in float32, then casts.
Per group or block::

    scale = max(amax(|block|), floor) / FP8_MAX    # FP8_MAX = 448, the largest finite e4m3 value
    q     = clamp(block / scale, -448, 448) -> float8_e4m3fn (round to nearest even)

with ``floor = SCALE_FLOOR`` (1e-10) for activations and 1e-12 for weights.

Activations are quantised per token at run time (``fp8_quant``: the FP8 GEMM's left operand and the
expert-dispatch wire format); weights once, when a checkpoint is written (``fp8_weight_quant``).
``fp8_quant`` dispatches to ``fp8_quant_triton`` (CUDA) or ``fp8_quant_reference`` (torch); the
rest is torch only. ``fp8_weight_dequant`` is DeepSeek's / transformers' ``weight_dequant``.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from epserve.kernels.backend import FLOAT_DTYPES, interpreting, use_triton

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_BLOCK = 128
SCALE_FLOOR = 1e-10          # activation groups: an all-zero group gets scale SCALE_FLOOR / FP8_MAX
_WEIGHT_SCALE_FLOOR = 1e-12  # weight blocks (what checkpoints have always been written with)
_TILE_ELEMENTS = 2048        # elements one program quantises: BLOCK_G groups of GS_PAD columns


# --------------------------------------------------------------------------------------------
# Blocks in torch
# --------------------------------------------------------------------------------------------
def _blocks(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``x [..., N, K]`` -> zero-padded blocks ``[..., ceil(N/rows), rows, ceil(K/cols), cols]``."""
    n, k = x.shape[-2:]
    nb, kb = -(-n // rows), -(-k // cols)
    if (nb * rows, kb * cols) != (n, k):
        x = F.pad(x, (0, kb * cols - k, 0, nb * rows - n))               # zeros move no amax
    return x.view(*x.shape[:-2], nb, rows, kb, cols)


def _unblock(blocks: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`_blocks`: ``[..., nb, rows, kb, cols]`` -> ``[..., N, K]`` (a view)."""
    *lead, nb, rows, kb, cols = blocks.shape
    return blocks.view(*lead, nb * rows, kb * cols)[..., :n, :k]


def _quant_blocks(x: torch.Tensor, rows: int, cols: int, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., N, K]`` -> ``(q [..., N, K] e4m3, scale [..., ceil(N/rows), ceil(K/cols)] float32)``."""
    n, k = x.shape[-2:]
    blocks = _blocks(x.float(), rows, cols)                               # [..., nb, rows, kb, cols]
    scale = blocks.abs().amax(dim=(-3, -1), keepdim=True).clamp_min(floor) / FP8_MAX  # [..., nb, 1, kb, 1]
    q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return _unblock(q, n, k).contiguous(), scale[..., 0, :, 0]


def _dequant_blocks(q: torch.Tensor, scale: torch.Tensor, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """``q [..., N, K]`` e4m3 with ``scale [..., ceil(N/rows), ceil(K/cols)]`` -> ``[..., N, K]`` in ``dtype``."""
    if q.dim() < 2:
        raise ValueError(f"FP8 values must be at least 2-D [..., N, K], got {tuple(q.shape)}")
    n, k = q.shape[-2:]
    want = (*q.shape[:-2], -(-n // rows), -(-k // cols))
    if tuple(scale.shape) != want:
        raise ValueError(f"scale must have shape {want} for {tuple(q.shape)} values, got {tuple(scale.shape)}")
    blocks = _blocks(q.float(), rows, cols) * scale.float()[..., :, None, :, None]   # float32
    return _unblock(blocks, n, k).to(dtype).contiguous()


# --------------------------------------------------------------------------------------------
# Weights: 128 x 128 blocks (torch)
# --------------------------------------------------------------------------------------------
def fp8_weight_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` float -> ``(w_q [N, K] e4m3, scale [ceil(N/128), ceil(K/128)] float32)``."""
    return _quant_blocks(w, FP8_BLOCK, FP8_BLOCK, _WEIGHT_SCALE_FLOOR)


def fp8_weight_dequant(w_q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``w_q [..., N, K]`` e4m3 with ``scale [..., ceil(N/128), ceil(K/128)]`` -> ``w [..., N, K]`` in ``dtype``.

    ``w = w_q * scale`` blockwise in float32, then cast, as DeepSeek's ``weight_dequant``; any
    leading dims (stacked experts) are batch dims. ValueError when ``scale`` has the wrong shape.
    """
    return _dequant_blocks(w_q, scale, FP8_BLOCK, FP8_BLOCK, dtype)


# --------------------------------------------------------------------------------------------
# Activations: 1 x group_size groups (Triton and torch)
# --------------------------------------------------------------------------------------------
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
def _fp8_quant_kernel(
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


def _check_inputs(x: torch.Tensor, group_size: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [M, K], got {getattr(x, 'shape', type(x))}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be float32/bfloat16/float16, got {x.dtype}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")


def fp8_quant_triton(x: torch.Tensor, group_size: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
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
    _fp8_quant_kernel[grid](
        x, x_q, scale,
        K, n_groups,
        x.stride(0), x_q.stride(0), scale.stride(0),
        group_size,
        GS_PAD=gs_pad, BLOCK_G=block_g,
        FP8_MAX_C=FP8_MAX, SCALE_FLOOR_C=SCALE_FLOOR, EMULATE_CAST=interpreting(x),
        num_warps=4,
    )
    return x_q, scale


def fp8_quant_reference(x: torch.Tensor, group_size: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch: same contract as :func:`fp8_quant_triton`."""
    _check_inputs(x, group_size)
    return _quant_blocks(x, 1, group_size, SCALE_FLOOR)


def fp8_quant(x: torch.Tensor, group_size: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> ``(x_q [M, K] e4m3, scale [M, ceil(K / group_size)])``: Triton when
    ``use_triton(x)``, else the torch reference."""
    if use_triton(x):
        return fp8_quant_triton(x, group_size)
    return fp8_quant_reference(x, group_size)


def fp8_dequant(x_q: torch.Tensor, scale: torch.Tensor, group_size: int = FP8_BLOCK,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`fp8_quant`: ``x_q [M, K]``, ``scale [M, ceil(K / group_size)]`` -> ``[M, K]`` in ``dtype``."""
    return _dequant_blocks(x_q, scale, 1, group_size, dtype)
