"""The placement planner against DeepSeek's EPLB algorithm, on DeepSeek-V3-shaped loads.

    python -m benchmarks.bench_placement [--layers 58] [--experts 256] [--redundant 32] [--seed 0]
                                         [--tokens 4096] [--nodes 8 4]

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

Node scenarios: 64 shards (64 redundant: one per shard) on ``--nodes`` nodes (shard s on node
s // (64 / N)), DeepSeek-V3's routing (8 groups, each token's top-8 experts within its top-4 groups;
``placement_routes``) over ``--tokens`` tokens per layer, the experts' and groups' preference
Zipf-skewed by 0.5 and 0.0 (uniform), then by 1.0 and 0.5; the load is the routes' tokens per
expert. Planners: ``plan`` (global), ``plan_node_aware`` (each group on one node), EPLB's global
policy and its hierarchical one (groups packed onto nodes, then EPLB's global policy within each
node, R / N copies each). For each: balancedness, ``cross_node_traffic`` (a token
on node t % N; one network send per remote node it needs) and planning time.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import print_table
from benchmarks.placement_routes import group_limited_routes, route_counts
from epserve.services.cluster.node_planner import cross_node_traffic, plan_node_aware
from epserve.services.cluster.planner import balancedness, plan, replicate

NODE_SHARDS, GROUPS, TOPK, TOPK_GROUP = 64, 8, 8, 4      # node scenarios: DeepSeek-V3's routing on 64 GPUs
NODE_REDUNDANT = 64                                       # one per GPU: EPLB needs (E + R) divisible by the GPUs
SKEWS = ((0.5, 0.0), (1.0, 0.5))                         # Zipf exponents of the experts' and the groups' preference


def zipf_load(layers: int, experts: int, exponent: float, generator: torch.Generator) -> torch.Tensor:
    """[layers, experts] tokens: a Zipf law over a random order of the experts, per layer."""
    ranks = torch.stack([torch.randperm(experts, generator=generator) for _ in range(layers)]) + 1
    return 1e6 / ranks.double() ** exponent


def balanced_packing(weights: torch.Tensor, packs: int) -> torch.Tensor:
    """EPLB's ``balanced_packing``: weights [X, n] -> [X, packs, n / packs] item indices; heaviest
    first, each onto the least loaded pack that still has room (ties: the lowest pack)."""
    rows, items = weights.shape
    out = torch.empty(rows, packs, items // packs, dtype=torch.int64)
    for row in range(rows):
        pack_load, pack_items = [0.0] * packs, [0] * packs
        for item in weights[row].sort(descending=True).indices.tolist():
            pack = min((p for p in range(packs) if pack_items[p] < items // packs), key=pack_load.__getitem__)
            out[row, pack, pack_items[pack]] = item
            pack_load[pack] += float(weights[row, item])
            pack_items[pack] += 1
    return out


def eplb_global(load: torch.Tensor, shards: int, redundant: int) -> torch.Tensor:
    """DeepSeek's EPLB global policy -> [L, S, slots] logical ids (duplicates on a GPU allowed)."""
    layers, experts = load.shape
    physical = experts + redundant
    if physical % shards:
        raise ValueError(f"EPLB needs (E + R) divisible by the GPUs: {physical} by {shards}")
    copies = replicate(load, redundant, physical)                      # EPLB caps copies at nothing
    ids = torch.stack([torch.repeat_interleave(torch.arange(experts), copies[l]) for l in range(layers)])  # [L, E + R]
    weights = (load / copies).gather(1, ids)
    return ids.gather(1, balanced_packing(weights, shards).flatten(1)).view(layers, shards, -1)


def eplb_hierarchical(load: torch.Tensor, shards: int, redundant: int, nodes: int, groups: int) -> torch.Tensor:
    """DeepSeek's EPLB hierarchical policy -> [L, S, slots]: groups packed onto nodes (equal counts),
    then within each node its R / N copies made and packed as the global policy does."""
    layers, experts = load.shape
    size = experts // groups
    node_groups = balanced_packing(load.view(layers, groups, size).sum(dim=2), nodes)          # [L, N, G / N]
    node_experts = (node_groups[..., None] * size + torch.arange(size)).flatten(2)             # [L, N, E / N]
    local_load = load.gather(1, node_experts.flatten(1)).view(layers * nodes, -1)
    local = eplb_global(local_load, shards // nodes, redundant // nodes).view(layers, nodes, -1)
    return node_experts.gather(2, local).view(layers, shards, -1)


def timed(fn) -> tuple[torch.Tensor, float]:
    best, result = float("inf"), None
    for _ in range(3):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def shard_scenarios(args: argparse.Namespace) -> None:
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


def node_scenarios(args: argparse.Namespace) -> None:
    rows = []
    for expert_zipf, group_zipf in SKEWS:
        generator = torch.Generator().manual_seed(args.seed)
        routes = group_limited_routes(args.layers, args.experts, GROUPS, TOPK, TOPK_GROUP, args.tokens,
                                      expert_zipf, group_zipf, generator)                     # [L, T, K]
        load = route_counts(routes, args.experts)
        for nodes in args.nodes:
            shards, redundant = NODE_SHARDS, NODE_REDUNDANT
            planners = {"epserve global": lambda: plan(load, shards, redundant),
                        "epserve node-aware": lambda: plan_node_aware(load, shards, redundant, nodes, GROUPS),
                        "eplb global": lambda: eplb_global(load, shards, redundant),
                        "eplb hierarchical": lambda: eplb_hierarchical(load, shards, redundant, nodes, GROUPS)}
            for name, planner in planners.items():
                members, seconds = timed(planner)
                fraction, remote_nodes = cross_node_traffic(routes, members, nodes)
                rows.append({"zipf": f"{expert_zipf}/{group_zipf}", "nodes": nodes, "planner": name,
                             "balancedness": round(balancedness(load, members), 4),
                             "cross-node fraction": round(fraction, 4),
                             "remote nodes / token": round(remote_nodes, 3), "plan s": round(seconds, 3)})
    print(f"\nnodes: layers={args.layers} experts={args.experts} in {GROUPS} groups, top-{TOPK} of top-{TOPK_GROUP} "
          f"groups, {args.tokens} tokens per layer, zipf = experts'/groups' preference skew, {NODE_SHARDS} shards, "
          f"redundant={NODE_REDUNDANT} seed={args.seed}; load = the routes' tokens per expert; cross-node fraction "
          f"= remote (token, node) sends / (token, expert) pairs")
    print_table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=58)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--redundant", type=int, default=32, help="shard scenarios: redundant slots")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=4096, help="node scenarios: routed tokens per layer")
    parser.add_argument("--nodes", type=int, nargs="+", default=[8, 4], help="node scenarios: nodes of the 64 shards")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shard_scenarios(args)
    node_scenarios(args)


if __name__ == "__main__":
    main()
