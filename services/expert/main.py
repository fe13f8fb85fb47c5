"""``epserve serve expert``: one expert shard (parse -> load its experts -> serve -> register -> SIGTERM)."""
from __future__ import annotations

import argparse
import logging

from services.cluster.grpc_server import start_grpc_server
from services.cluster.registry import Registry
from services.cluster.state import LoadStats, choose_placement
from services.expert.shard import ExpertShard
from services.lifecycle import advertised, connect, device_and_dtype, setup_logging, shutdown_event
from services.model.config import ModelConfig
from services.model.tiny import resolve_model
from services.proto import expert_pb2_grpc

log = logging.getLogger("epserve.expert")
SERVICE_NAME = "epserve.v1.ExpertService"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shard-id", type=int, required=True, help="this shard's index in [0, --expert-shards)")
    parser.add_argument("--flush-interval", type=float, default=1.0, help="seconds between load-counter flushes")


def run(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    stop = shutdown_event()
    client, keys = connect(args)
    path = resolve_model(args.model)
    config = ModelConfig.from_hf(path)
    if not 0 <= args.shard_id < args.expert_shards:
        raise ValueError(f"--shard-id must be in [0, {args.expert_shards}), got {args.shard_id}")
    placement = choose_placement(client, keys, num_experts=config.n_routed_experts, num_shards=args.expert_shards,
                                 redundant=args.redundant_experts, moe_layers=config.moe_layers,
                                 profile_path=args.load_profile)
    device, dtype = device_and_dtype(args)
    stats = LoadStats(client, keys)
    shard = ExpertShard(path, args.shard_id, placement, dtype=dtype, device=device,
                        on_flush=lambda delta: stats.flush(args.shard_id, placement, delta),
                        flush_interval_s=args.flush_interval)
    server = start_grpc_server(lambda s: expert_pb2_grpc.add_ExpertServiceServicer_to_server(shard, s),
                               [SERVICE_NAME], address=f"{args.host}:{args.port}")
    heartbeat = Registry(client, keys).register(
        "expert", str(args.shard_id), advertised(args, server.port),
        {"shard_id": args.shard_id, "placement_version": placement.version, "slots_per_shard": placement.slots_per_shard})
    log.info("expert shard %d serving on %s (placement v%d)", args.shard_id, server.address, placement.version)
    stop.wait()
    heartbeat.stop()
    server.stop(grace=5)
    shard.close()
    return 0
