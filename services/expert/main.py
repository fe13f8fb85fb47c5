"""``epserve serve expert``: one expert shard (config -> load its experts -> serve -> register -> follow the
placement, host a placement controller -> SIGTERM)."""
from __future__ import annotations

import logging

from epserve.services.cluster.cluster_tls import server_security
from epserve.services.cluster.grpc_server import start_grpc_server
from epserve.services.cluster import nixl_transport
from epserve.services.cluster.local_transport import LocalExpertServer
from epserve.services.cluster.registry import Registry
from epserve.services.cluster.controller import PlacementController
from epserve.services.cluster.state import LoadStats, PlacementStore
from epserve.services.cluster.transport import host_id
from epserve.services.config import ExpertConfig
from epserve.services.expert.follower import PlacementFollower
from epserve.services.expert.shard import ExpertShard
from epserve.services.lifecycle import start_service
from epserve.services.metrics import export_expert_counters, serve_metrics
from epserve.services.model.tiny import resolve_model
from epserve.services.model_service import device_and_dtype, service_placement
from epserve.services.proto import expert_pb2_grpc

log = logging.getLogger("epserve.expert")
SERVICE_NAME = "epserve.v1.ExpertService"


def run(config: ExpertConfig) -> int:
    if not 0 <= config.shard_id < config.expert_shards:
        raise ValueError(f"--shard-id must be in [0, {config.expert_shards}), got {config.shard_id}")
    service = start_service(config)
    client, keys, stop = service.client, service.keys, service.stop
    placement = service_placement(config, service)
    device, dtype = device_and_dtype(config)
    stats = LoadStats(client, keys)
    shard = ExpertShard(resolve_model(config.model), config.shard_id, placement, dtype=dtype, device=device,
                        on_flush=lambda held, delta: stats.flush(config.shard_id, held, delta),
                        flush_interval_s=config.flush_interval)
    server = start_grpc_server(lambda s: expert_pb2_grpc.add_ExpertServiceServicer_to_server(shard, s),
                               [SERVICE_NAME], address=f"{config.host}:{config.port}",
                               health_address=config.health_address(), **server_security(service.tls, aio=False))
    label = f"expert shard {config.shard_id}"
    data_servers = [LocalExpertServer(shard.serve, label)]
    endpoints = {"local_endpoint": data_servers[0].name, "host": host_id(), "local_cuda": device.startswith("cuda")}
    if nixl_transport.available():
        data_servers.append(nixl_transport.NixlExpertServer(shard.serve, label, config.host, config.advertise_host))
        endpoints["nixl_endpoint"] = data_servers[-1].name
    export_expert_counters(shard.tokens_served, shard.choices_dropped)
    metrics_port = serve_metrics(config.host, config.metrics_port)
    if metrics_port is not None:
        endpoints["metrics_address"] = config.advertised(metrics_port)
    registry = Registry(client, keys)
    info = lambda versions: {"shard_id": config.shard_id, "placement_versions": versions,  # noqa: E731
                             "capacity": config.own_capacity(), **endpoints}
    heartbeat = registry.register("expert", str(config.shard_id), config.advertised(server.port),
                                  info(shard.versions()))
    follower = PlacementFollower(shard, PlacementStore(client, keys), registry,
                                 lambda versions: heartbeat.update(info(versions))).start()
    controller = PlacementController(
        client, keys, redundant=config.redundant_experts, interval_s=config.rebalance_interval,
        threshold=config.rebalance_threshold, window_s=config.rebalance_window,
        ready_timeout_s=config.ready_timeout).start() if config.controller else None
    log.info("expert shard %d serving on %s (placement v%d)", config.shard_id, server.address, placement.version)
    stop.wait()
    if controller is not None:
        controller.stop()
    follower.stop()
    heartbeat.stop()
    for data_server in data_servers:
        data_server.close()
    server.stop(grace=5)
    shard.close()
    return 0
