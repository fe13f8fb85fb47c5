"""``epserve serve attention``: one attention/prefill replica.

config -> placement (from Redis) -> wait for every expert shard of it -> remote expert backend ->
engine + engine loop -> gRPC server -> register with load in the heartbeat -> SIGTERM: drain,
deregister, stop. A placement version committed later is staged for the next step boundary.
"""
from __future__ import annotations

import logging
import threading
import time

from epserve.services.attention.engine_loop import EngineLoop
from epserve.services.attention.remote_experts import RemoteExperts
from epserve.services.attention.service import SERVICE_NAME, AttentionServicer, add_to_server
from epserve.services.cluster.grpc_server import start_aio_grpc_server
from epserve.services.cluster.placement import Placement
from epserve.services.cluster.placement_versions import current_version
from epserve.services.cluster.registry import Registry
from epserve.services.cluster.requests import RequestStore
from epserve.services.cluster.state import PlacementStore
from epserve.services.cluster.local_transport import slot_bytes_for
from epserve.services.cluster.transport import ExpertTransport, ShardEndpoint
from epserve.services.config import AttentionConfig
from epserve.services.engine.engine import LLMEngine
from epserve.services.lifecycle import start_service
from epserve.services.model.tiny import resolve_model
from epserve.services.model_service import device_and_dtype, service_placement

log = logging.getLogger("epserve.attention")


def run(config: AttentionConfig) -> int:
    service = start_service(config)
    client, keys, stop = service.client, service.keys, service.stop
    placement = service_placement(config, service)
    registry = Registry(client, keys)
    model = service.model
    transport = ExpertTransport(
        _shard_endpoints(registry, config, placement), mode=config.transport,
        local_slot_bytes=slot_bytes_for(config.max_num_batched_tokens, model.hidden_size, model.num_experts_per_tok),
        resolve=lambda shard: _live_shard_endpoint(registry, shard, experts.placement.version))
    experts = RemoteExperts(placement, transport, wire_dtype=config.wire_dtype)
    device, dtype = device_and_dtype(config)
    engine = LLMEngine.from_path(resolve_model(config.model), config.engine(), dtype=dtype, device=device,
                                 backend=experts)
    loop = EngineLoop(engine, on_step=RequestStore(client, keys).append_tokens, step_retries=config.step_retries,
                      between_steps=experts.at_step_boundary).start()
    servicer = AttentionServicer(loop, config.replica_id, lambda: experts.placement.version)
    server = start_aio_grpc_server(add_to_server(servicer), [SERVICE_NAME], address=f"{config.host}:{config.port}")
    kinds = "+".join(sorted({transport.kind(shard) for shard in transport.endpoints}))
    static = {"max_num_seqs": config.max_num_seqs, "kv_bytes_per_token": engine.runner.kv_bytes_per_token,
              "expert_transport": kinds}
    info = lambda: {**loop.load(), **static, "placement_version": experts.placement.version}  # noqa: E731
    heartbeat = registry.register("attention", config.replica_id, config.advertised(server.port), info())
    threading.Thread(target=_report_load, args=(heartbeat, info, stop), daemon=True).start()
    threading.Thread(target=_follow_placement, args=(PlacementStore(client, keys), experts, loop, stop),
                     daemon=True).start()
    log.info("attention replica %s serving on %s (placement v%d, expert transport %s)", config.replica_id,
             server.address, placement.version, kinds)
    stop.wait()
    _drain(loop, server, config.drain_timeout)
    heartbeat.stop()
    server.stop(grace=2)
    loop.stop()
    transport.close()
    return 0


def _shard_endpoints(registry: Registry, config: AttentionConfig, placement: Placement) -> dict[int, ShardEndpoint]:
    """Wait until every shard holding slots of the placement serves it; shard id -> its endpoint."""
    needed = set(placement.shards_in_use())
    deadline = time.monotonic() + config.shard_wait
    while True:
        shards = [s for s in registry.live("expert")
                  if int(s.service_id) in needed and placement.version in s.info.get("placement_versions", ())]
        if len(shards) == len(needed):
            return {int(s.service_id): ShardEndpoint.from_service(s) for s in shards}
        if time.monotonic() > deadline:
            raise TimeoutError(f"expert shards serving placement v{placement.version}: {len(shards)} of "
                               f"{len(needed)} after {config.shard_wait} s")
        time.sleep(0.2)


def _live_shard_endpoint(registry: Registry, shard: int, version: int) -> ShardEndpoint | None:
    """Where shard ``shard`` serving placement ``version`` is registered now (after a restart, say)."""
    return next((ShardEndpoint.from_service(s) for s in registry.live("expert")
                 if s.service_id == str(shard) and version in s.info.get("placement_versions", ())), None)


def _follow_placement(store: PlacementStore, experts: RemoteExperts, loop: EngineLoop, stop: threading.Event) -> None:
    """Stage each newly committed placement version for the engine loop's next step boundary (at once if
    it is backing off after a failed step: the new version may be what the step needs)."""
    staged = None
    while not stop.wait(0.1):
        try:
            version = current_version(store.client, store.keys)
            if version is not None and version > experts.placement.version and version != staged:
                experts.stage(store.get(version))
                staged = version
                loop.wake()
        except Exception:                                # noqa: BLE001 - Redis away: keep the placement
            log.warning("attention: reading the current placement failed", exc_info=True)


def _report_load(heartbeat, info, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        heartbeat.update(info())


def _drain(loop: EngineLoop, server, timeout_s: float) -> None:
    """Stop admitting (health NOT_SERVING, registry says draining) and let running requests finish."""
    loop.draining = True
    server.enter_graceful_shutdown()
    deadline = time.monotonic() + timeout_s
    while loop.in_flight() and time.monotonic() < deadline:
        time.sleep(0.1)
