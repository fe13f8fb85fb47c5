"""Block-scaled FP8 GEMM (DeepSeek-V3 / DeepGEMM style) and the FP8 linear layer built on it.

``fp8_gemm`` dispatches to ``fp8_gemm_triton`` (CUDA) or ``fp8_gemm_reference`` (torch: dequantise
both operands, one float32 matmul); ``fp8_linear`` quantises activations and calls ``fp8_gemm``.
Operands, in the FP8 block format of :mod:`epserve.kernels.fp8` (128 = ``FP8_BLOCK``)::

    a_q     [M, K]                 float8_e4m3fn   activations, 1 x 128 groups along K
    a_scale [M, ceil(K/128)]       float32         a[m, k] = a_q[m, k] * a_scale[m, k // 128]
    w_q     [N, K]                 float8_e4m3fn   Linear weight (y = a @ w.T), 128 x 128 blocks
    w_scale [ceil(N/128), ceil(K/128)] float32     DeepSeek ``weight_scale_inv``:
                                                   w[n, k] = w_q[n, k] * w_scale[n // 128, k // 128]
    out     [M, N]                 out_dtype       out = a @ w.T

The kernel walks K in 128-wide blocks (one scale per block): per block it takes the dot of the raw
fp8 tiles (fp32 accumulation), multiplies it by ``a_scale[:, kb] x w_scale[:, kb]`` and adds it to
an fp32 accumulator. Small-M (decode) shapes split K across programs to fill the GPU; the fp32
partial sums are added on the host.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from epserve.kernels.backend import FLOAT_DTYPES, interpreting, use_triton
from epserve.kernels.fp8 import FP8_BLOCK, FP8_DTYPE, fp8_dequant, fp8_quant, fp8_weight_dequant


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, c_ptr,
    M, N, K, kb_per_split,
    stride_am, stride_ak, stride_asm, stride_ask,
    stride_wn, stride_wk, stride_wsn, stride_wsk,
    stride_cs, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program (tile, split) computes C[split, tile] over K blocks [split*kb_per_split, ...)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    # Grouped tile order: GROUP_M row-tiles share each weight column-tile while it is in L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_id = pid // (GROUP_M * num_pid_n)
    first_m = group_id * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_rows)
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M                                   # wrapped rows/cols: loads stay in bounds,
    cols = offs_n % N                                   # the store is masked
    offs_k = tl.arange(0, BLOCK_K)

    kb_start = split * kb_per_split
    kb_end = tl.minimum(kb_start + kb_per_split, tl.cdiv(K, BLOCK_K))
    a_ptrs = a_ptr + rows[:, None] * stride_am + (kb_start * BLOCK_K + offs_k)[None, :] * stride_ak
    w_ptrs = w_ptr + cols[None, :] * stride_wn + (kb_start * BLOCK_K + offs_k)[:, None] * stride_wk
    as_ptrs = as_ptr + rows * stride_asm + kb_start * stride_ask              # [BLOCK_M]
    ws_ptrs = ws_ptr + (cols // BLOCK_K) * stride_wsn + kb_start * stride_wsk  # [BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_start, kb_end):
        if EVEN_K:
            a = tl.load(a_ptrs)                                                # [BLOCK_M, BLOCK_K]
            w = tl.load(w_ptrs)                                                # [BLOCK_K, BLOCK_N]
        else:
            k_left = K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        a_s = tl.load(as_ptrs)
        w_s = tl.load(ws_ptrs)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(a, w) * a_s[:, None] * w_s[None, :]
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
        as_ptrs += stride_ask
        ws_ptrs += stride_wsk

    c_ptrs = c_ptr + split * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class GemmConfig:
    """Launch parameters of :func:`_fp8_gemm_kernel` (BLOCK_K is always ``FP8_BLOCK``)."""
    block_m: int
    block_n: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_config(M: int, N: int, K: int, num_sms: int) -> GemmConfig:
    """Tile shape by M; split K when the output tiles alone cannot fill the GPU's SMs.

    Measured on an H100 at the V3 shapes (CUDA-graph timed, cold L2): 64x128 tiles with 4 warps
    beat 128x128 / 8 warps and 128x256 for M = 512..4096; at M <= 64 the tile shapes were within
    ~5% of each other, and splitting K only helped when the grid was far below the SM count.
    """
    if M <= 16:
        cfg = GemmConfig(block_m=16, block_n=64, num_warps=4, num_stages=4)
    elif M <= 64:
        cfg = GemmConfig(block_m=64, block_n=64, num_warps=4, num_stages=4)
    else:
        cfg = GemmConfig(block_m=64, block_n=128, num_warps=4, num_stages=4)
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    k_blocks = triton.cdiv(K, FP8_BLOCK)
    split = min(max(1, num_sms // tiles), max(1, k_blocks // 4), 16)
    return GemmConfig(cfg.block_m, cfg.block_n, split, cfg.group_m, cfg.num_warps, cfg.num_stages)


def _needs_upcast(x: torch.Tensor) -> bool:
    """fp8 ``tl.dot`` needs sm_89+; the interpreter runs the dot on upcast float32 tiles instead."""
    if interpreting(x):
        return True
    return torch.cuda.get_device_capability(x.device) < (8, 9)


def _check_inputs(a_q, a_scale, w_q, w_scale, out_dtype) -> None:
    for name, t in (("a_q", a_q), ("w_q", w_q)):
        if t.dim() != 2 or t.dtype != FP8_DTYPE:
            raise ValueError(f"{name} must be a 2-D float8_e4m3fn tensor, got {t.dtype} {tuple(t.shape)}")
    M, K = a_q.shape
    N = w_q.shape[0]
    kb = -(-K // FP8_BLOCK)
    if w_q.shape[1] != K:
        raise ValueError(f"w_q must be [N, K={K}], got {tuple(w_q.shape)}")
    expected = (("a_scale", a_scale, (M, kb)), ("w_scale", w_scale, (-(-N // FP8_BLOCK), kb)))
    for name, t, shape in expected:
        if t.dtype != torch.float32 or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be float32 {shape}, got {t.dtype} {tuple(t.shape)}")
    for name, t in (("a_scale", a_scale), ("w_q", w_q), ("w_scale", w_scale)):
        if t.device != a_q.device:
            raise ValueError(f"{name} is on {t.device}, a_q on {a_q.device}")
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be one of {FLOAT_DTYPES}, got {out_dtype}")


def _launch(a_q, a_scale, w_q, w_scale, out_dtype, cfg: GemmConfig) -> torch.Tensor:
    M, K = a_q.shape
    N = w_q.shape[0]
    k_blocks = triton.cdiv(K, FP8_BLOCK)
    kb_per_split = triton.cdiv(k_blocks, cfg.split_k)
    split = triton.cdiv(k_blocks, kb_per_split)           # no empty splits
    c_dtype = out_dtype if split == 1 else torch.float32
    c = torch.empty((split, M, N), dtype=c_dtype, device=a_q.device)  # [split, M, N]
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), split)
    _fp8_gemm_kernel[grid](
        a_q, a_scale, w_q, w_scale, c,
        M, N, K, kb_per_split,
        a_q.stride(0), a_q.stride(1), a_scale.stride(0), a_scale.stride(1),
        w_q.stride(0), w_q.stride(1), w_scale.stride(0), w_scale.stride(1),
        c.stride(0), c.stride(1), c.stride(2),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=FP8_BLOCK,
        GROUP_M=cfg.group_m, EVEN_K=K % FP8_BLOCK == 0, UPCAST=_needs_upcast(a_q),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return c[0] if split == 1 else c.sum(dim=0).to(out_dtype)


def fp8_gemm_triton(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                    out_dtype: torch.dtype = torch.bfloat16, *, config: GemmConfig | None = None) -> torch.Tensor:
    """Triton: ``out [M, N] = dequant(a_q, a_scale) @ dequant(w_q, w_scale).T`` in ``out_dtype``.

    ``config`` overrides the tile choice of :func:`pick_config` (tests, tuning).
    """
    _check_inputs(a_q, a_scale, w_q, w_scale, out_dtype)
    M, K = a_q.shape
    N = w_q.shape[0]
    if M == 0 or N == 0 or K == 0:
        return torch.zeros((M, N), dtype=out_dtype, device=a_q.device)
    cfg = config or pick_config(M, N, K, _num_sms(a_q.device))
    return _launch(a_q, a_scale, w_q, w_scale, out_dtype, cfg)


def fp8_gemm_reference(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor,
                       w_scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Torch: same contract as :func:`fp8_gemm_triton`.

    Dequantises both operands to float32 and does one matmul: the scales are constant per 128-wide K
    block, so this is the block-wise sum of the kernel up to float32 rounding order.
    """
    _check_inputs(a_q, a_scale, w_q, w_scale, out_dtype)
    a = fp8_dequant(a_q, a_scale)  # [M, K] float32
    return (a @ fp8_weight_dequant(w_q, w_scale).T).to(out_dtype)


def fp8_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``out [M, N] = a @ w.T`` in ``out_dtype``: Triton when ``use_triton(a_q)``, else the torch reference."""
    if use_triton(a_q):
        return fp8_gemm_triton(a_q, a_scale, w_q, w_scale, out_dtype)
    return fp8_gemm_reference(a_q, a_scale, w_q, w_scale, out_dtype)


def fp8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``y = x @ w.T`` for an FP8 block-quantised weight: ``x [..., K]`` -> ``[..., N]`` in ``x.dtype``.

    ``x`` is quantised per 1 x 128 group (:func:`epserve.kernels.fp8.fp8_quant`) and multiplied with
    :func:`fp8_gemm`; both dispatch on ``x``'s device.
    """
    if x.shape[-1] != w_q.shape[-1]:
        raise ValueError(f"x has K={x.shape[-1]} but w_q is {tuple(w_q.shape)}")
    lead = x.shape[:-1]
    a_q, a_scale = fp8_quant(x.reshape(-1, x.shape[-1]))               # [T, K], [T, K/128]
    y = fp8_gemm(a_q, a_scale, w_q, w_scale, out_dtype=x.dtype)        # [T, N]
    return y.view(*lead, w_q.shape[0])
