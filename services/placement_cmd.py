"""``epserve placement plan|show``: the planner as a command, and how balanced a running cluster is.

    epserve placement plan --load LOAD.json --shards S --redundant R [--capacity C0,C1,...]
                           [--nodes N [--node-aware --groups G]] --out PLAN.json
    epserve placement show (--state-file PATH | --redis URL --cluster NAME) [--window SECONDS] [--json]
    epserve placement rebalance (--state-file PATH | --redis URL --cluster NAME) [--force] [--timeout SECONDS]

``show`` reads the cluster's current placement and the expert load its shards counted (Redis) and
prints, per MoE layer, the balancedness now and what a re-plan with the same shards and slots gives.
``rebalance`` asks the cluster's placement controller to re-plan now: it switches (live, two-phase)
when the balancedness gains at least its threshold, or with ``--force``; prints what it did.

``LOAD.json``: ``{"load": [[tokens per logical expert] per MoE layer]}``, optionally with
``"routes": [[[logical experts of token t] per token] per MoE layer]``. ``PLAN.json``:
``{"layers": [[[logical expert ids on shard 0], [... shard 1], ...] per layer], "balancedness": x,
"balancedness_without_redundancy": y}``, where a copy carries load / copies of its expert and
balancedness is the mean over layers of mean shard time / max shard time (time = load / capacity).

``--nodes N``: shard s is on node s // (S / N). With routes, PLAN.json also gets
``"cross_node_fraction"`` (network sends of hidden states / (token, expert) dispatches; a token
sends once to each other node it needs) and ``"remote_nodes_per_token"`` (see
``node_planner.cross_node_traffic``). ``--node-aware --groups G``:
each of the G expert groups (E / G consecutive experts) keeps all its copies on one node, G / N
groups per node and R / N redundant copies per node: fewer nodes per token, less balance.
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
    p.add_argument("--load", type=Path, required=True,
                   help="JSON: {\"load\": [[tokens per expert] per layer]}, optionally \"routes\" (see above)")
    p.add_argument("--shards", type=int, required=True, help="S: expert shards")
    p.add_argument("--redundant", type=int, default=0, help="R: extra slots for copies of hot experts")
    p.add_argument("--capacity", default=None, help="relative speed of each shard, comma-separated (default: equal)")
    p.add_argument("--nodes", type=int, default=None, help="N: nodes, S / N shards each (contiguous)")
    p.add_argument("--node-aware", action="store_true", help="keep each expert group on one node (needs --groups)")
    p.add_argument("--groups", type=int, default=None, help="G: expert groups of the model's routing (DeepSeek-V3: 8)")
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
    from epserve.services.cluster.node_planner import cross_node_traffic
    from epserve.services.cluster.planner import balancedness

    load, routes = _read_load(args.load)
    capacity = _read_capacity(args.capacity)
    planner = _planner(args)
    try:
        members, baseline = planner(load, args.redundant, capacity), planner(load, 0, capacity)
        traffic = cross_node_traffic(routes, members, args.nodes) if args.nodes and routes else None
    except ValueError as err:
        raise UsageError(str(err)) from None
    result = {"layers": [[[e for e in shard if e >= 0] for shard in layer] for layer in members.tolist()],
              "balancedness": round(balancedness(load, members, capacity), 6),
              "balancedness_without_redundancy": round(balancedness(load, baseline, capacity), 6)}
    if args.nodes:
        result.update(nodes=args.nodes, node_aware=args.node_aware)
    if traffic is not None:
        result.update(cross_node_fraction=round(traffic[0], 6), remote_nodes_per_token=round(traffic[1], 6))
    args.out.write_text(json.dumps(result))
    print(f"{args.out}: {load.shape[0]} layers, {args.shards} shards, {args.redundant} redundant: balancedness "
          f"{result['balancedness']:.4f} (without redundancy {result['balancedness_without_redundancy']:.4f})")
    if args.nodes:
        mode = f"node-aware, {args.groups} groups" if args.node_aware else "global plan"
        print(f"{args.nodes} nodes ({mode}): " + (
            f"cross-node fraction {traffic[0]:.4f}, {traffic[1]:.3f} remote nodes per token" if traffic is not None
            else f'cross-node traffic needs "routes" in {args.load}'))
    return 0


def _planner(args: argparse.Namespace):
    """plan(load, redundant, capacity) as the flags ask: global, or each expert group on one node."""
    from epserve.services.cluster.node_planner import node_of_shard, plan_node_aware
    from epserve.services.cluster.planner import plan

    if (args.node_aware or args.groups is not None) and not (
            args.node_aware and args.nodes is not None and args.groups is not None):
        raise UsageError("--node-aware and --groups go together, with --nodes")
    if args.nodes is not None:
        try:
            node_of_shard(args.shards, args.nodes)
        except ValueError as err:
            raise UsageError(f"--nodes {args.nodes}: {err}") from None
    if args.node_aware:
        return lambda load, redundant, capacity: plan_node_aware(
            load, args.shards, redundant, args.nodes, args.groups, capacity)
    return lambda load, redundant, capacity: plan(load, args.shards, redundant, capacity)


def _read_capacity(text: str | None):
    import torch

    if not text:
        return None
    try:
        return torch.tensor([float(c) for c in text.split(",")], dtype=torch.float64)
    except ValueError:
        raise UsageError(f"--capacity: expected comma-separated numbers, got {text!r}") from None


def _read_load(path: Path):
    """LOAD.json -> (load [L, E] float64, routes: [T, K] int64 per layer, or None)."""
    import torch

    try:
        raw = json.loads(path.read_text())
        load = torch.tensor(raw["load"], dtype=torch.float64)
        routes = None if raw.get("routes") is None else [torch.tensor(r, dtype=torch.int64) for r in raw["routes"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UsageError(f"--load {path}: expected {{\"load\": [[tokens per expert] per layer]}}, optionally "
                         f"\"routes\": [[[experts] per token] per layer] ({err})") from None
    if load.dim() != 2 or load.numel() == 0 or bool((load < 0).any()):
        raise UsageError(f"--load {path}: need one non-negative count per expert in every layer, "
                         f"all layers the same length")
    if routes is not None and (len(routes) != load.shape[0] or any(r.dim() != 2 or not r.numel() for r in routes)):
        raise UsageError(f"--load {path}: \"routes\" needs, for each of the {load.shape[0]} layers, "
                         f"the same number of experts for every token (at least one token)")
    return load, routes
