"""``epserve serve expert``: one expert shard (parse -> load its experts -> serve -> register -> SIGTERM)."""
from __future__ import annotations

import argparse
import logging

from epserve.services.cluster.grpc_server import start_grpc_server
from epserve.services.cluster.registry import Registry
from epserve.services.cluster.state import LoadStats
from epserve.services.expert.shard import ExpertShard
from epserve.services.lifecycle import advertised, device_and_dtype, service_placement, start_service
from epserve.services.proto import expert_pb2_grpc

log = logging.getLogger("epserve.expert")
SERVICE_NAME = "epserve.v1.ExpertService"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shard-id", type=int, required=True, help="this shard's index in [0, --expert-shards)")
    parser.add_argument("--flush-interval", type=float, default=1.0, help="seconds between load-counter flushes")


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.shard_id < args.expert_shards:
        raise ValueError(f"--shard-id must be in [0, {args.expert_shards}), got {args.shard_id}")
    service = start_service(args)
    client, keys, path, stop = service.client, service.keys, service.model_path, service.stop
    placement = service_placement(args, service)
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
