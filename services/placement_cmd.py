"""``epserve placement plan``: a placement from expert loads, offline (the planner as a command).

    epserve placement plan --load LOAD.json --shards S --redundant R [--capacity C0,C1,...] --out PLAN.json

``LOAD.json``: ``{"load": [[tokens per logical expert] per MoE layer]}``. ``PLAN.json``:
``{"layers": [[[logical expert ids on shard 0], [... shard 1], ...] per layer], "balancedness": x,
"balancedness_without_redundancy": y}``, where a copy carries load / copies of its expert and
balancedness is the mean over layers of mean shard time / max shard time (time = load / capacity).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

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
