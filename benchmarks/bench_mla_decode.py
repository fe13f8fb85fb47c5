"""Benchmark MLA decode attention: Triton kernel vs the torch reference.

    python -m benchmarks.bench_mla_decode                      # CPU: small sizes, torch only
    python -m benchmarks.bench_mla_decode --device cuda        # V3 decode shapes on a GPU
    python -m benchmarks.bench_mla_decode --csv out.csv

On CUDA the Triton kernel is timed by CUDA-graph replay (as a decode step runs it), the torch
reference by plain launches (it reads the longest length on the host, so it cannot be captured).
Bandwidth counts the KV rows read once: ``B * seq_len * (L + R) * bytes``; FLOPs are
``2 * B * H * seq_len * (2L + R)`` (scores plus the weighted sum of latents).
"""
import argparse
import csv
import os
import statistics
import time

import torch

if not torch.cuda.is_available():  # --triton on the CPU runs the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.mla_decode import (  # noqa: E402
    mla_decode_num_splits, mla_decode_reference, mla_decode_triton)

H100_HBM_BYTES_PER_S = 3.35e12
H100_BF16_FLOPS = 989e12
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_inputs(batch, heads, seq_len, latent, rope, block_size, dtype, device, seed=0):
    """Random decode inputs, every sequence ``seq_len`` long, pages shuffled over the pool."""
    gen = torch.Generator().manual_seed(seed)
    pages_per_seq = -(-seq_len // block_size)
    num_blocks = batch * pages_per_seq
    kv_cache = torch.randn(num_blocks, block_size, latent + rope, generator=gen)  # [NB, BS, L+R]
    q_latent = torch.randn(batch, heads, latent, generator=gen)  # [B, H, L]
    q_rope = torch.randn(batch, heads, rope, generator=gen)  # [B, H, R]
    block_table = torch.randperm(num_blocks, generator=gen).view(batch, pages_per_seq)
    seq_lens = torch.full((batch,), seq_len, dtype=torch.int32)
    return (q_latent.to(device, dtype), q_rope.to(device, dtype), kv_cache.to(device, dtype),
            block_table.to(device, torch.int32), seq_lens.to(device))


def time_ms(fn, iters: int, device: torch.device, graph: bool = False) -> float:
    """Median time of ``fn()`` in ms over ``iters`` runs after a warm-up. ``graph``: replay
    ``fn`` captured in a CUDA graph, 10 calls per replay, so launch overhead drops out."""
    fn()
    if graph:
        graph_obj = _capture(fn, 10)
        return statistics.median(_cuda_times(graph_obj.replay, iters)) / 10
    if device.type == "cuda":
        return statistics.median(_cuda_times(fn, iters))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _capture(fn, calls: int) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up off the default stream, as capture requires
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def _cuda_times(fn, iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def bench_shape(args, batch, heads, seq_len, device, dtype):
    """Rows (dicts) for every provider on one shape."""
    inputs = make_inputs(batch, heads, seq_len, args.latent, args.rope, args.block_size,
                         dtype, device)
    scale = (args.latent // 4 + args.rope) ** -0.5  # qk_nope 128 + rope 64 in V3
    providers = {"torch": lambda: mla_decode_reference(*inputs, scale)}
    if device.type == "cuda" or args.triton:
        splits = args.num_splits or mla_decode_num_splits(batch, heads, seq_len, dtype, device)
        providers["triton"] = lambda: mla_decode_triton(*inputs, scale, num_splits=splits)
    kv_bytes = batch * seq_len * (args.latent + args.rope) * dtype.itemsize
    flops = 2 * batch * heads * seq_len * (2 * args.latent + args.rope)
    rows = []
    for name, fn in providers.items():
        ms = time_ms(fn, args.iters, device, graph=name == "triton" and device.type == "cuda")
        rows.append(dict(batch=batch, heads=heads, seq_len=seq_len, provider=name,
                         ms=ms, gbps=kv_bytes / ms / 1e6, tflops=flops / ms / 1e9,
                         hbm_frac=kv_bytes / ms / 1e-3 / H100_HBM_BYTES_PER_S,
                         flop_frac=flops / ms / 1e-3 / H100_BF16_FLOPS))
    return rows


def print_table(rows, device):
    cols = "batch heads seq_len provider ms GB/s TFLOP/s".split()
    if device.type == "cuda":
        cols += ["%HBM", "%BF16"]
    print(" ".join(f"{c:>9}" for c in cols))
    for r in rows:
        cells = [r["batch"], r["heads"], r["seq_len"], r["provider"], f"{r['ms']:.4f}",
                 f"{r['gbps']:.1f}", f"{r['tflops']:.2f}"]
        if device.type == "cuda":
            cells += [f"{100 * r['hbm_frac']:.1f}", f"{100 * r['flop_frac']:.1f}"]
        print(" ".join(f"{c:>9}" for c in cells))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", help="default 1 32 128 (CPU: 1 4)")
    parser.add_argument("--seq-len", type=int, nargs="+", help="default 1024 4096 (CPU: 256)")
    parser.add_argument("--heads", type=int, nargs="+", help="default 128 16 (CPU: 16)")
    parser.add_argument("--latent", type=int, default=512, help="kv_lora_rank L")
    parser.add_argument("--rope", type=int, default=64, help="qk_rope_head_dim R")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--num-splits", type=int, default=None, help="default: automatic")
    parser.add_argument("--iters", type=int, default=None, help="default 50 (CPU: 5)")
    parser.add_argument("--triton", action="store_true",
                        help="on CPU also time the Triton interpreter (slow, not meaningful)")
    parser.add_argument("--csv", metavar="PATH", help="also write the rows as CSV")
    args = parser.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    args.batch = args.batch or ([1, 32, 128] if on_cuda else [1, 4])
    args.seq_len = args.seq_len or ([1024, 4096] if on_cuda else [256])
    args.heads = args.heads or ([128, 16] if on_cuda else [16])
    args.iters = args.iters or (50 if on_cuda else 5)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = _DTYPES[args.dtype]
    print(f"MLA decode, L={args.latent} R={args.rope} block_size={args.block_size} "
          f"{args.dtype} on {device}, num_splits={args.num_splits or 'auto'}")
    rows = []
    for heads in args.heads:
        for batch in args.batch:
            for seq_len in args.seq_len:
                rows += bench_shape(args, batch, heads, seq_len, device, dtype)
    print_table(rows, device)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
