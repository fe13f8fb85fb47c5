"""Benchmark the fused DeepSeek-V3 gate top-k (sigmoid + bias + group-limited top-k + renorm).

    python -m benchmarks.bench_gate_topk [--device cuda] [--t 1 16 256 4096] [--csv out.csv]

Runs gate_topk_triton against gate_topk_reference (torch) on the same router logits
(default V3 shape: E=256, n_group=8, topk_group=4, top_k=8). The op is memory/launch bound:
bytes = logits + bias read + weights and ids written; %hbm is against 3.35 TB/s. On the CPU only
the torch reference runs unless ``--triton`` is given.
"""
import torch

from benchmarks.common import H100_HBM_BYTES_PER_S, bench_parser, print_table, time_ms, write_csv
from epserve.kernels.gate_topk import gate_topk_reference, gate_topk_triton

COLUMNS = ["T", "E", "n_group", "topk_group", "top_k", "provider", "ms", "us/token", "GB/s", "%hbm"]


def bench_tokens(T: int, E: int, n_group: int, topk_group: int, top_k: int, device: torch.device,
                 run_triton: bool, iters: int) -> list[dict]:
    logits = torch.randn(T, E, device=device)  # [T, E] float32
    bias = torch.randn(E, device=device) * 0.1
    args = (logits, bias, n_group, topk_group, top_k, 2.5, True)
    nbytes = T * E * 4 + E * 4 + T * top_k * 8
    providers = [("torch", gate_topk_reference)] + ([("triton", gate_topk_triton)] if run_triton else [])
    rows = []
    for name, fn in providers:
        ms = time_ms(lambda: fn(*args), device, iters, graph_calls=1, flush_l2=True)
        gbs = nbytes / ms / 1e6
        rows.append({"T": T, "E": E, "n_group": n_group, "topk_group": topk_group, "top_k": top_k,
                     "provider": name, "ms": f"{ms:.4f}", "us/token": f"{ms * 1e3 / T:.3f}",
                     "GB/s": f"{gbs:.2f}",
                     "%hbm": f"{100 * gbs * 1e9 / H100_HBM_BYTES_PER_S:.2f}" if device.type == "cuda" else "-"})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--t", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096], help="token counts")
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--n-group", type=int, default=8)
    parser.add_argument("--topk-group", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--iters", type=int, help="timed runs per case (default 100; CPU: 20)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    iters = args.iters or (100 if on_cuda else 20)
    rows = [row for T in args.t
            for row in bench_tokens(T, args.experts, args.n_group, args.topk_group, args.top_k, device,
                                    on_cuda or args.triton, iters)]
    print_table(rows, COLUMNS)
    if args.csv:
        write_csv(args.csv, rows, COLUMNS)


if __name__ == "__main__":
    main()
