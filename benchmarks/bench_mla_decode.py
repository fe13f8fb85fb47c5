"""Benchmark MLA decode attention: Triton kernel vs the torch reference.

    python -m benchmarks.bench_mla_decode                      # CPU: small sizes, torch only
    python -m benchmarks.bench_mla_decode --device cuda        # V3 decode shapes on a GPU
    python -m benchmarks.bench_mla_decode --csv out.csv

On CUDA the Triton kernel is timed by CUDA-graph replay (as a decode step runs it), the torch
reference by plain launches (it reads the longest length on the host, so it cannot be captured).
Bandwidth counts the KV rows read once: ``B * seq_len * (L + R) * bytes``; FLOPs are
``2 * B * H * seq_len * (2L + R)`` (scores plus the weighted sum of latents).
"""
import torch

from benchmarks.common import H100_HBM_BYTES_PER_S, H100_PEAK_FLOPS, bench_parser, print_table, time_ms, write_csv
from epserve.kernels.mla_decode import mla_decode_num_splits, mla_decode_reference, mla_decode_triton

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
        ms = time_ms(fn, device, args.iters, graph_calls=10 if name == "triton" else None)
        rows.append(dict(batch=batch, heads=heads, seq_len=seq_len, provider=name,
                         ms=ms, gbps=kv_bytes / ms / 1e6, tflops=flops / ms / 1e9,
                         hbm_frac=kv_bytes / ms / 1e-3 / H100_HBM_BYTES_PER_S,
                         flop_frac=flops / ms / 1e-3 / H100_PEAK_FLOPS["bf16"]))
    return rows


def table_rows(rows: list[dict], device: torch.device) -> list[dict]:
    """``rows`` as printed: figures rounded and, on CUDA, as percentages of the H100 peaks."""
    table = []
    for r in rows:
        cells = {"batch": r["batch"], "heads": r["heads"], "seq_len": r["seq_len"], "provider": r["provider"],
                 "ms": f"{r['ms']:.4f}", "GB/s": f"{r['gbps']:.1f}", "TFLOP/s": f"{r['tflops']:.2f}"}
        if device.type == "cuda":
            cells["%HBM"] = f"{100 * r['hbm_frac']:.1f}"
            cells["%BF16"] = f"{100 * r['flop_frac']:.1f}"
        table.append(cells)
    return table


def parse_args(argv=None):
    parser = bench_parser(__doc__)
    parser.add_argument("--batch", type=int, nargs="+", help="default 1 32 128 (CPU: 1 4)")
    parser.add_argument("--seq-len", type=int, nargs="+", help="default 1024 4096 (CPU: 256)")
    parser.add_argument("--heads", type=int, nargs="+", help="default 128 16 (CPU: 16)")
    parser.add_argument("--latent", type=int, default=512, help="kv_lora_rank L")
    parser.add_argument("--rope", type=int, default=64, help="qk_rope_head_dim R")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--num-splits", type=int, default=None, help="default: automatic")
    parser.add_argument("--iters", type=int, default=None, help="default 50 (CPU: 5)")
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
    print_table(table_rows(rows, device))
    if args.csv:
        write_csv(args.csv, rows)


if __name__ == "__main__":
    main()
