"""Benchmark FP8 activation quantisation and the block-scaled FP8 GEMM at DeepSeek-V3 shapes.

    python -m benchmarks.bench_fp8_gemm [--device cuda] [--m 1 64 512 4096] [--csv out.csv]

Rows per (M, N, K): ``quant`` (fp8_quant_triton of [M, K] bf16 vs fp8_quant_reference, GB/s),
``gemm`` (fp8_gemm_triton vs a torch bf16 matmul on the dequantised weight and vs
fp8_gemm_reference, which the CPU model runs; TFLOP/s and GB/s) and ``linear`` (fp8_linear: quant
+ gemm). Peak fractions are for an H100 SXM:
3.35 TB/s HBM, 1979 FP8 / 989 BF16 dense TFLOP/s. On the CPU only the torch providers run unless
``--triton`` is given (the interpreter is far too slow to time meaningfully).
"""
import torch

from benchmarks.common import H100_HBM_BYTES_PER_S, H100_PEAK_FLOPS, bench_parser, print_table, time_ms, write_csv
from epserve.kernels.backend import use_triton
from epserve.kernels.fp8 import (
    FP8_BLOCK, FP8_DTYPE, FP8_MAX, fp8_quant_reference, fp8_quant_triton, fp8_weight_dequant,
)
from epserve.kernels.fp8_gemm import fp8_gemm_reference, fp8_gemm_triton, fp8_linear

V3_SHAPES = [(7168, 2048), (24576, 1536), (2112, 7168)]  # (N, K): o_proj-like, q_b_proj, fused q_a/kv_a
COLUMNS = ["op", "M", "N", "K", "provider", "ms", "TFLOP/s", "GB/s", "%peak_flops", "%hbm"]


def report_row(op, M, N, K, provider, ms, flops, nbytes, peak_key, device) -> dict:
    on_cuda = device.type == "cuda"
    tflops = flops / ms / 1e9 if flops else 0.0
    gbs = nbytes / ms / 1e6
    return {"op": op, "M": M, "N": N, "K": K, "provider": provider, "ms": f"{ms:.4f}",
            "TFLOP/s": f"{tflops:.3g}" if flops else "-", "GB/s": f"{gbs:.1f}",
            "%peak_flops": f"{100 * tflops * 1e12 / H100_PEAK_FLOPS[peak_key]:.1f}" if on_cuda and flops else "-",
            "%hbm": f"{100 * gbs * 1e9 / H100_HBM_BYTES_PER_S:.1f}" if on_cuda else "-"}


def random_fp8_weight(N: int, K: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``w_q [N, K]`` e4m3 and ``w_scale [ceil(N/128), ceil(K/128)]``, as in a checkpoint."""
    w_q = (torch.randn(N, K, device=device) * 64).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    w_scale = torch.rand(-(-N // FP8_BLOCK), -(-K // FP8_BLOCK), device=device) * 1e-3 + 1e-4
    return w_q, w_scale


def bench_shape(M: int, N: int, K: int, device: torch.device, run_triton: bool, iters: int) -> list[dict]:
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    w_q, w_scale = random_fp8_weight(N, K, device)
    w_bf16 = fp8_weight_dequant(w_q, w_scale, torch.bfloat16)
    a_q, a_scale = fp8_quant_reference(x)
    flops = 2 * M * N * K
    quant_bytes = M * K * 2 + M * K + a_scale.numel() * 4
    fp8_bytes = M * K + N * K + (a_scale.numel() + w_scale.numel()) * 4 + M * N * 2
    bf16_bytes = 2 * (M * K + N * K + M * N)
    cases = [("quant", "torch", lambda: fp8_quant_reference(x), 0, quant_bytes, "fp8"),
             ("gemm", "torch-bf16", lambda: x @ w_bf16.T, flops, bf16_bytes, "bf16"),
             ("gemm", "torch-ref", lambda: fp8_gemm_reference(a_q, a_scale, w_q, w_scale), flops, fp8_bytes, "fp8")]
    if run_triton:
        cases += [("quant", "triton", lambda: fp8_quant_triton(x), 0, quant_bytes, "fp8"),
                  ("gemm", "triton-fp8", lambda: fp8_gemm_triton(a_q, a_scale, w_q, w_scale), flops, fp8_bytes, "fp8"),
                  ("linear", "triton-fp8" if use_triton(x) else "torch-ref",  # fp8_linear dispatches on x
                   lambda: fp8_linear(x, w_q, w_scale), flops, fp8_bytes + quant_bytes, "fp8")]
    rows = []
    for op, provider, fn, fl, nb, peak in cases:
        ms = time_ms(fn, device, iters, graph_calls=1, flush_l2=True)
        rows.append(report_row(op, M, N, K, provider, ms, fl, nb, peak, device))
    return sorted(rows, key=lambda r: (r["op"], r["provider"]))


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--m", type=int, nargs="+", help="token counts (default 1 64 512 4096; CPU: 1 16)")
    parser.add_argument("--shapes", nargs="+", help="N,K pairs (default the V3 shapes)")
    parser.add_argument("--iters", type=int, help="timed runs per case (default 50; CPU: 5)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    ms = args.m or ([1, 64, 512, 4096] if on_cuda else [1, 16])
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else V3_SHAPES
    iters = args.iters or (50 if on_cuda else 5)
    rows = [row for N, K in shapes for M in ms
            for row in bench_shape(M, N, K, device, on_cuda or args.triton, iters)]
    print_table(rows, COLUMNS)
    if args.csv:
        write_csv(args.csv, rows, COLUMNS)


if __name__ == "__main__":
    main()
