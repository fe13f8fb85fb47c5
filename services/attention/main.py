"""``epserve serve attention``: one attention/prefill replica.

config -> placement (from Redis) -> wait for every expert shard of it -> remote expert backend ->
engine + engine loop -> gRPC server -> register with load in the heartbeat -> SIGTERM: drain,
deregister, stop. A placement version committed later is staged for the next step boundary.
"""
from __future__ import annotations

import logging
import threading
import time

import redis

from epserve.services.attention.engine_loop import EngineLoop
from epserve.services.attention.remote_experts import RemoteExperts
from epserve.services.attention.token_log import TokenLogWriter
from epserve.services.attention.service import SERVICE_NAME, AttentionServicer, add_to_server
from epserve.services.cluster.cluster_tls import server_security
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
from epserve.services import metrics
from epserve.services.lifecycle import start_service
from epserve.services.metrics import serve_metrics
from epserve.services.model.tiny import resolve_model
from epserve.services.model_service import device_and_dtype, service_placement

log = logging.getLogger("epserve.attention")


def run(config: AttentionConfig) -> int:
    service = start_service(config)
    client, keys, stop = service.client, service.keys, service.stop
    placement = service_placement(config, service)
    registry = Registry(client, keys)
    model = service.model
    device, dtype = device_and_dtype(config)
    transport = ExpertTransport(
        _shard_endpoints(registry, config, placement), mode=config.transport,
        local_slot_bytes=slot_bytes_for(config.max_num_batched_tokens, model.hidden_size, model.num_experts_per_tok),
        resolve=lambda shard: _live_shard_endpoint(registry, shard, experts.placement.version), tls=service.tls,
        device=device)
    experts = RemoteExperts(placement, transport, wire_dtype=config.wire_dtype, hedge_after_s=config.hedge_after)
    engine = LLMEngine.from_path(resolve_model(config.model), config.engine(), dtype=dtype, device=device,
                                 backend=experts)
    token_log = TokenLogWriter(RequestStore(client, keys))
    loop = EngineLoop(engine, on_step=token_log.append, step_retries=config.step_retries,
                      between_steps=experts.at_step_boundary).start()
    servicer = AttentionServicer(loop, config.replica_id, lambda: experts.placement.version,
                                 max_in_flight=config.max_num_seqs + config.max_waiting)
    server = start_aio_grpc_server(add_to_server(servicer), [SERVICE_NAME], address=f"{config.host}:{config.port}",
                                   health_address=config.health_address(), **server_security(service.tls, aio=True))
    kinds = "+".join(sorted({transport.kind(shard) for shard in transport.endpoints}))
    static = {"max_num_seqs": config.max_num_seqs, "kv_bytes_per_token": engine.runner.kv_bytes_per_token,
              "expert_transport": kinds}
    metrics_port = serve_metrics(config.host, config.metrics_port)
    if metrics_port is not None:
        static["metrics_address"] = config.advertised(metrics_port)
        _export_load(loop)
    info = lambda: {**loop.load(), **static, "placement_version": experts.placement.version}  # noqa: E731
    heartbeat = registry.register("attention", config.replica_id, config.advertised(server.port), info())
    threading.Thread(target=_report_load, args=(heartbeat, info, stop), daemon=True).start()
    threading.Thread(target=watch_progress, args=(loop, server, config.stall_timeout, stop), daemon=True).start()
    threading.Thread(target=_follow_placement, args=(PlacementStore(client, keys), experts, loop, stop),
                     daemon=True).start()
    log.info("attention replica %s serving on %s (placement v%d, expert transport %s)", config.replica_id,
             server.address, placement.version, kinds)
    stop.wait()
    _drain(loop, server, config, registry, announce=lambda: heartbeat.update(info()))
    heartbeat.stop()
    server.stop(grace=2)
    loop.stop()
    token_log.stop()
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


def watch_progress(loop: EngineLoop, server, stall_s: float, stop: threading.Event, every_s: float = 1.0) -> None:
    """Health NOT_SERVING while the engine loop has work and has completed no step for ``stall_s`` (a
    hung engine: Kubernetes' liveness probe restarts it); SERVING again if it recovers."""
    stalled = False
    while not stop.wait(every_s):
        now = loop.stalled_s() > stall_s
        if now != stalled and not loop.draining:
            stalled = now
            log.log(logging.ERROR if stalled else logging.INFO, "engine loop %s", "stalled: reporting NOT_SERVING"
                    if stalled else "progressing again: SERVING")
            server.set_serving(not stalled)


def _export_load(loop: EngineLoop) -> None:
    """The engine's load as Prometheus gauges, read at each scrape."""
    def kv_usage() -> float:
        load = loop.load()
        return load["kv_blocks_used"] / max(1, load["kv_blocks_total"])

    metrics.KV_USAGE.set_function(kv_usage)
    metrics.ENGINE_RUNNING.set_function(lambda: loop.load()["running"])
    metrics.ENGINE_WAITING.set_function(lambda: loop.load()["waiting"])


def _report_load(heartbeat, info, stop: threading.Event) -> None:
    """Refresh the registry entry's load every 0.5 s; Redis being away only skips refreshes."""
    while not stop.wait(0.5):
        try:
            heartbeat.update(info())
        except redis.RedisError as err:
            log.warning("attention: reporting load failed: %s", err)


def _drain(loop: EngineLoop, server, config: AttentionConfig, registry: Registry, announce) -> None:
    """Stop admitting (health NOT_SERVING, registry says draining). When another replica serves, hand every
    running request off to it (its router resumes it there with the tokens so far); else let them finish
    within ``drain_timeout``."""
    loop.draining = True
    try:
        announce()                                       # routers stop choosing it at once
    except redis.RedisError as err:                      # they learn it when its entry expires
        log.warning("attention replica %s: announcing the drain failed: %s", config.replica_id, err)
    server.enter_graceful_shutdown()
    others = [r for r in registry.live("attention") if r.service_id != config.replica_id and not r.info.get("draining")]
    if others and loop.in_flight():
        log.info("attention replica %s: draining, handing %d requests to %s", config.replica_id, loop.in_flight(),
                 [r.service_id for r in others])
        loop.hand_off(f"replica {config.replica_id} is draining (SIGTERM): resume on another")
    deadline = time.monotonic() + config.drain_timeout
    while loop.in_flight() and time.monotonic() < deadline:
        time.sleep(0.1)
