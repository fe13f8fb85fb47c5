"""Fused MoE benchmark: Triton vs the torch paths (reference, batched torch) on DeepSeek-V3 shapes.

    python -m benchmarks.bench_fused_moe                       # CUDA if present, else small CPU run
    python -m benchmarks.bench_fused_moe --tokens 1 64 --modes fp8 --csv moe.csv

Figures per (tokens, weight mode, provider): median time, TFLOP/s (2 * 3 * T * K * D * I flops of
the routed choices) and GB/s of expert weights touched (distinct experts hit * 3 * D * I * bytes,
plus FP8 scales), and on CUDA their fractions of the H100 peaks (3.35 TB/s HBM; the MMA peak of
the dtype the dot runs in: BF16 989 TFLOP/s for both modes, since FP8 weights are W8A16).
On the CPU only the torch paths are timed unless ``--triton`` is given (the interpreter is slow).
"""
import argparse

import torch

from benchmarks.common import H100_HBM_BYTES_PER_S, H100_PEAK_FLOPS, bench_parser, print_table, time_ms, write_csv
from epserve.kernels.fp8 import FP8_BLOCK, FP8_DTYPE
from epserve.kernels.fused_moe import fused_moe_reference, fused_moe_torch, fused_moe_triton


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    p.add_argument("--tokens", type=int, nargs="+", help="T values (default: 1 64 512 2048 on CUDA, 1 16 64 on CPU)")
    p.add_argument("--hidden", type=int, help="D (default 7168 on CUDA, 256 on CPU)")
    p.add_argument("--inter", type=int, help="I, the expert intermediate size (default 2048 on CUDA, 128 on CPU)")
    p.add_argument("--experts", type=int, help="E local experts (default 256 on CUDA, 16 on CPU)")
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--modes", nargs="+", choices=["fp32", "bf16", "fp8"],
                   help="weights (x is bf16, or fp32 with fp32 weights: the CPU's serving dtype); "
                        "default bf16 fp8 on CUDA, fp32 bf16 fp8 on CPU")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-reference", action="store_true", help="skip timing the torch paths")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.tokens = args.tokens or ([1, 64, 512, 2048] if cuda else [1, 16, 64])
    args.hidden = args.hidden or (7168 if cuda else 256)
    args.inter = args.inter or (2048 if cuda else 128)
    args.experts = args.experts or (256 if cuda else 16)
    args.modes = args.modes or (["bf16", "fp8"] if cuda else ["fp32", "bf16", "fp8"])
    return args


def make_weights(E: int, D: int, I: int, mode: str, device: str) -> tuple[list, dict]:
    """Random ``w_gate, w_up, w_down`` (and FP8 block scales): ``[E, I, D], [E, I, D], [E, D, I]``."""
    shapes = ((I, D), (I, D), (D, I))
    if mode in ("fp32", "bf16"):
        dtype = torch.float32 if mode == "fp32" else torch.bfloat16
        return [torch.randn(E, n, k, dtype=dtype, device=device) / k ** 0.5 for n, k in shapes], {}
    weights = [torch.randn(E, n, k, dtype=torch.bfloat16, device=device).to(FP8_DTYPE) for n, k in shapes]
    scales = [torch.full((E, -(-n // FP8_BLOCK), -(-k // FP8_BLOCK)), k ** -0.5, device=device) for n, k in shapes]
    return weights, dict(zip(("w_gate_scale", "w_up_scale", "w_down_scale"), scales))


def make_routing(T: int, E: int, K: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform routing: ``topk_weights [T, K]`` float32 (softmax) and distinct ``topk_ids [T, K]``."""
    scores = torch.rand(T, E, device=device)
    weights, ids = scores.topk(K, dim=1)
    return torch.softmax(weights, dim=1), ids.to(torch.int32)


def bench_case(args, T: int, mode: str, weights: list, scales: dict) -> list[dict]:
    cuda = args.device.startswith("cuda")
    D, I, E, K = args.hidden, args.inter, args.experts, args.topk
    x = torch.randn(T, D, dtype=torch.float32 if mode == "fp32" else torch.bfloat16, device=args.device)
    topk_weights, topk_ids = make_routing(T, E, K, args.device)
    call = (x, *weights, topk_weights, topk_ids)
    providers = {}
    if cuda or args.triton:
        providers["triton"] = lambda: fused_moe_triton(*call, **scales)
    if not args.no_reference:
        providers["torch"] = lambda: fused_moe_reference(*call, **scales)
        providers["torch-batched"] = lambda: fused_moe_torch(*call, **scales)

    hit = torch.unique(topk_ids).numel()
    weight_bytes = hit * 3 * D * I * weights[0].element_size()
    weight_bytes += sum(s[0].numel() * 4 for s in scales.values()) * hit
    flops = 2 * 3 * T * K * D * I
    rows = []
    for name, fn in providers.items():
        ms = time_ms(fn, torch.device(args.device), args.iters, warmup=2)
        tflops, gbs = flops / ms / 1e9, weight_bytes / ms / 1e6
        row = dict(tokens=T, experts=E, topk=K, hidden=D, inter=I, weights=mode, provider=name,
                   experts_hit=hit, ms=round(ms, 4), tflops=round(tflops, 2), gbs=round(gbs, 1))
        if cuda:
            row["pct_hbm"] = round(100 * gbs * 1e9 / H100_HBM_BYTES_PER_S, 1)
            row["pct_bf16_mma"] = round(100 * tflops * 1e12 / H100_PEAK_FLOPS["bf16"], 1)
        rows.append(row)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = []
    for mode in args.modes:
        weights, scales = make_weights(args.experts, args.hidden, args.inter, mode, args.device)
        for T in args.tokens:
            rows += bench_case(args, T, mode, weights, scales)
        del weights, scales
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print_table(rows)
    if args.csv:
        write_csv(args.csv, rows)


if __name__ == "__main__":
    main()
