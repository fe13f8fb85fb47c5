"""The placement planner against DeepSeek's EPLB algorithm, on DeepSeek-V3-shaped loads.

    python -m benchmarks.bench_placement [--layers 58] [--experts 256] [--redundant 32] [--seed 0]

Loads: per MoE layer, tokens per expert Zipf-distributed (exponent 0.6, 1.0, 1.4) over a random
permutation of the experts (so every layer is skewed differently). Scenarios: 32, 48 and 72 shards
of equal speed, and 32 shards of which a quarter run at half speed (experts in CPU DRAM, say).

``eplb`` is this file's implementation of the algorithm DeepSeek published (github.com/deepseek-ai/
EPLB, the global policy used for decode): give redundant copies one by one to the expert with the
most load per copy, then pack the copies onto GPUs heaviest first, each onto the least loaded GPU
that still has a free slot (every GPU gets exactly (E + R) / S). It knows nothing of shard speeds
and may put two copies of an expert on one GPU. ``epserve`` is ``planner.plan``. Balancedness is
the mean over layers of mean shard time / max shard time; planning time is wall seconds for all
layers (best of 3).
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import print_table
from epserve.services.cluster.planner import balancedness, plan, replicate


def zipf_load(layers: int, experts: int, exponent: float, generator: torch.Generator) -> torch.Tensor:
    """[layers, experts] tokens: a Zipf law over a random order of the experts, per layer."""
    ranks = torch.stack([torch.randperm(experts, generator=generator) for _ in range(layers)]) + 1
    return 1e6 / ranks.double() ** exponent


def eplb_global(load: torch.Tensor, shards: int, redundant: int) -> torch.Tensor:
    """DeepSeek's EPLB global policy -> [L, S, slots] logical ids (duplicates on a GPU allowed)."""
    layers, experts = load.shape
    physical = experts + redundant
    if physical % shards:
        raise ValueError(f"EPLB needs (E + R) divisible by the GPUs: {physical} by {shards}")
    copies = replicate(load, redundant, physical)                      # EPLB caps copies at nothing
    slots = physical // shards
    out = torch.empty(layers, shards, slots, dtype=torch.int64)
    for layer in range(layers):                                         # balanced_packing, as published
        ids = torch.repeat_interleave(torch.arange(experts), copies[layer])
        weights = load[layer, ids] / copies[layer, ids]
        pack_load, pack_items = [0.0] * shards, [0] * shards
        for item in weights.sort(descending=True).indices.tolist():
            pack = min((p for p in range(shards) if pack_items[p] < slots), key=pack_load.__getitem__)
            out[layer, pack, pack_items[pack]] = ids[item]
            pack_load[pack] += float(weights[item])
            pack_items[pack] += 1
    return out


def timed(fn) -> tuple[torch.Tensor, float]:
    best, result = float("inf"), None
    for _ in range(3):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=58)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--redundant", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    scenarios = [(s, z, None) for s in (32, 48, 72) for z in (0.6, 1.0, 1.4)]
    slow = torch.tensor([0.5] * 8 + [1.0] * 24, dtype=torch.float64)
    scenarios += [(32, z, slow) for z in (1.0, 1.4)]
    rows = []
    for shards, exponent, capacity in scenarios:
        load = zipf_load(args.layers, args.experts, exponent, torch.Generator().manual_seed(args.seed))
        ours, ours_s = timed(lambda: plan(load, shards, args.redundant, capacity))
        theirs, theirs_s = timed(lambda: eplb_global(load, shards, args.redundant))
        ours_b, theirs_b = balancedness(load, ours, capacity), balancedness(load, theirs, capacity)
        rows.append({"shards": shards, "zipf": exponent, "capacity": "1/4 at 0.5x" if capacity is not None else "equal",
                     "no redundancy": round(balancedness(load, plan(load, shards, 0, capacity), capacity), 4),
                     "eplb": round(theirs_b, 4), "epserve": round(ours_b, 4),
                     "epserve - eplb": round(ours_b - theirs_b, 4),
                     "eplb s": round(theirs_s, 3), "epserve s": round(ours_s, 3)})
    print(f"layers={args.layers} experts={args.experts} redundant={args.redundant} seed={args.seed}; "
          f"balancedness = mean over layers of mean / max shard time; seconds to plan all layers (best of 3)")
    print_table(rows)


if __name__ == "__main__":
    main()
