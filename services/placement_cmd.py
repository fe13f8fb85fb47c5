"""``epserve placement plan|show``: the planner as a command, and how balanced a running cluster is.

    epserve placement plan --load LOAD.json --shards S --redundant R [--capacity C0,C1,...] --out PLAN.json
    epserve placement show (--state-file PATH | --redis URL --cluster NAME) [--window SECONDS] [--json]
    epserve placement rebalance (--state-file PATH | --redis URL --cluster NAME) [--force] [--timeout SECONDS]

``show`` reads the cluster's current placement and the expert load its shards counted (Redis) and
prints, per MoE layer, the balancedness now and what a re-plan with the same shards and slots gives.
``rebalance`` asks the cluster's placement controller to re-plan now: it switches (live, two-phase)
when the balancedness gains at least its threshold, or with ``--force``; prints what it did.

``LOAD.json``: ``{"load": [[tokens per logical expert] per MoE layer]}``. ``PLAN.json``:
``{"layers": [[[logical expert ids on shard 0], [... shard 1], ...] per layer], "balancedness": x,
"balancedness_without_redundancy": y}``, where a copy carries load / copies of its expert and
balancedness is the mean over layers of mean shard time / max shard time (time = load / capacity).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from epserve.services.config import ServiceConfig
from epserve.services.up_state import read_up_state
from epserve.services.usage import UsageError


def add_placement_parser(commands) -> None:
    placement = commands.add_parser("placement", help="expert placement tools", description=__doc__)
    tools = placement.add_subparsers(dest="tool", required=True, metavar="TOOL")
    p = tools.add_parser("plan", help="plan a placement from expert loads", description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", type=Path, required=True, help="JSON: {\"load\": [[tokens per expert] per layer]}")
    p.add_argument("--shards", type=int, required=True, help="S: expert shards")
    p.add_argument("--redundant", type=int, default=0, help="R: extra slots for copies of hot experts")
    p.add_argument("--capacity", default=None, help="relative speed of each shard, comma-separated (default: equal)")
    p.add_argument("--out", type=Path, required=True, help="where to write PLAN.json")
    p.set_defaults(handler=run_plan)
    show = tools.add_parser("show", help="balancedness of a running cluster's placement, and of a re-plan",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_cluster_flags(show)
    show.add_argument("--window", type=float, default=None, metavar="SECONDS",
                      help="load of the last SECONDS only (whole minutes; up to an hour; default: since the start)")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(handler=run_show)
    rebalance = tools.add_parser("rebalance", help="ask the placement controller to re-plan now (live switch)",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_cluster_flags(rebalance)
    rebalance.add_argument("--force", action="store_true", help="switch even below the controller's threshold")
    rebalance.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the switch (default: 300)")
    rebalance.set_defaults(handler=run_rebalance)


def _add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--state-file", type=Path, help="an `epserve up --state-file` (its Redis and cluster)")
    where.add_argument("--redis", help="Redis URL of the cluster")
    parser.add_argument("--cluster", default=ServiceConfig.cluster, help="with --redis: the cluster name")


def _connect(args: argparse.Namespace):
    """(Redis client, Keys) of the cluster the flags name."""
    import redis

    from epserve.services.cluster.keys import Keys

    url, cluster = args.redis, args.cluster
    if args.state_file:
        state = read_up_state(args.state_file)
        url, cluster = state["redis_url"], state["cluster"]
    return redis.Redis.from_url(url), Keys(cluster)


def run_rebalance(args: argparse.Namespace) -> int:
    from epserve.services.cluster.controller import request_rebalance

    client, keys = _connect(args)
    try:
        answer = request_rebalance(client, keys, force=args.force, timeout_s=args.timeout)
    except TimeoutError as err:
        raise UsageError(str(err)) from None
    committed = answer["committed"]
    print(f"{'switched to placement v%d' % committed if committed else 'no switch'}: {answer['reason']}")
    return 0 if committed or "below the threshold" in answer["reason"] else 1


def run_show(args: argparse.Namespace) -> int:
    from epserve.services.cluster.planner import layer_balancedness, plan
    from epserve.services.cluster.state import LoadStats, PlacementStore

    client, keys = _connect(args)
    cluster = keys.cluster
    placement = PlacementStore(client, keys).current()
    if placement is None:
        raise UsageError(f"cluster {cluster!r} has no placement in Redis yet")
    load = LoadStats(client, keys).logical_load(placement.moe_layers, placement.num_experts, args.window)
    if load is None:
        raise UsageError(f"cluster {cluster!r}: no expert load counted yet (send some requests first)")
    rows, shards = len(placement.moe_layers), placement.num_shards
    members = placement.physical_to_logical.view(rows, shards, placement.slots_per_shard)
    redundant = int((members >= 0).sum(dim=(1, 2))[0]) - placement.num_experts
    now, replan = (layer_balancedness(load, m).tolist() for m in (members, plan(load, shards, redundant)))
    report = {"placement_version": placement.version, "shards": shards, "redundant": redundant,
              "layers": [{"layer": layer, "tokens": int(load[i].sum()), "balancedness": round(now[i], 6),
                          "after_replan": round(replan[i], 6)} for i, layer in enumerate(placement.moe_layers)],
              "balancedness": round(sum(now) / rows, 6), "after_replan": round(sum(replan) / rows, 6)}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"placement v{placement.version}: {shards} shards, {redundant} redundant; balancedness (mean / max "
          f"shard load) now {report['balancedness']:.4f}, after a re-plan {report['after_replan']:.4f}")
    print(f"{'layer':>6} {'tokens':>10} {'now':>7} {'re-plan':>8}")
    for row in report["layers"]:
        print(f"{row['layer']:>6} {row['tokens']:>10} {row['balancedness']:>7.4f} {row['after_replan']:>8.4f}")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    import torch

    from epserve.services.cluster.planner import balancedness, plan

    load = _read_load(args.load)
    capacity = None
    if args.capacity:
        try:
            capacity = torch.tensor([float(c) for c in args.capacity.split(",")], dtype=torch.float64)
        except ValueError:
            raise UsageError(f"--capacity: expected comma-separated numbers, got {args.capacity!r}") from None
    try:
        members = plan(load, args.shards, args.redundant, capacity)
        baseline = plan(load, args.shards, 0, capacity)
    except ValueError as err:
        raise UsageError(str(err)) from None
    result = {"layers": [[[e for e in shard if e >= 0] for shard in layer] for layer in members.tolist()],
              "balancedness": round(balancedness(load, members, capacity), 6),
              "balancedness_without_redundancy": round(balancedness(load, baseline, capacity), 6)}
    args.out.write_text(json.dumps(result))
    print(f"{args.out}: {load.shape[0]} layers, {args.shards} shards, {args.redundant} redundant: balancedness "
          f"{result['balancedness']:.4f} (without redundancy {result['balancedness_without_redundancy']:.4f})")
    return 0


def _read_load(path: Path):
    import torch

    try:
        rows = json.loads(path.read_text())["load"]
        load = torch.tensor(rows, dtype=torch.float64)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"--load {path}: expected {{\"load\": [[tokens per expert] per layer]}} ({err})") from None
    if load.dim() != 2 or load.numel() == 0 or bool((load < 0).any()):
        raise UsageError(f"--load {path}: need one non-negative count per expert in every layer, "
                         f"all layers the same length")
    return load
