"""``epserve serve attention``: one attention/prefill replica.

parse -> placement (from Redis) -> wait for every expert shard of it -> remote expert backend ->
engine + engine loop -> gRPC server -> register with load in the heartbeat -> SIGTERM: drain,
deregister, stop.
"""
from __future__ import annotations

import argparse
import logging
import threading
import time

from epserve.services.attention.engine_loop import EngineLoop
from epserve.services.attention.remote_experts import RemoteExperts
from epserve.services.attention.service import SERVICE_NAME, AttentionServicer, add_to_server
from epserve.services.cluster.grpc_server import start_aio_grpc_server
from epserve.services.cluster.registry import Registry
from epserve.services.cluster.state import RequestStore
from epserve.services.cluster.transport import GrpcExpertTransport
from epserve.services.engine.engine import EngineConfig, LLMEngine
from epserve.services.lifecycle import advertised, device_and_dtype, service_placement, start_service

log = logging.getLogger("epserve.attention")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replica-id", required=True, help="unique id of this replica in the cluster")
    parser.add_argument("--micro-batches", type=int, default=2, help="micro-batches in flight (2-4 hide expert round trips)")
    parser.add_argument("--micro-batch-min-tokens", type=int, default=128,
                        help="split a step only into micro-batches of at least this many tokens "
                             "(bench_micro_batches: on the CPU a smaller split costs more than it hides)")
    parser.add_argument("--wire-dtype", choices=("model", "fp8"), default="model",
                        help="activations to expert shards in the model dtype, or FP8 with 1x128 scales")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-kv-blocks", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024)
    parser.add_argument("--shard-wait", type=float, default=300.0, help="seconds to wait for the expert shards")
    parser.add_argument("--drain-timeout", type=float, default=30.0)


def run(args: argparse.Namespace) -> int:
    service = start_service(args)
    client, keys, path, stop = service.client, service.keys, service.model_path, service.stop
    placement = service_placement(args, service)
    registry = Registry(client, keys)
    transport = GrpcExpertTransport(_shard_addresses(registry, args, placement.version),
                                    resolve=lambda shard: _live_shard_address(registry, shard, placement.version))
    device, dtype = device_and_dtype(args)
    engine_config = EngineConfig(block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                                 max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                 micro_batches=args.micro_batches, micro_batch_min_tokens=args.micro_batch_min_tokens)
    engine = LLMEngine.from_path(path, engine_config, dtype=dtype, device=device,
                                 backend=RemoteExperts(placement, transport, wire_dtype=args.wire_dtype))
    loop = EngineLoop(engine, on_step=RequestStore(client, keys).append_tokens).start()
    servicer = AttentionServicer(loop, args.replica_id, placement.version)
    server = start_aio_grpc_server(add_to_server(servicer), [SERVICE_NAME], address=f"{args.host}:{args.port}")
    static = {"max_num_seqs": args.max_num_seqs, "placement_version": placement.version,
              "kv_bytes_per_token": engine.runner.kv_bytes_per_token}
    info = lambda: {**loop.load(), **static}  # noqa: E731
    heartbeat = registry.register("attention", args.replica_id, advertised(args, server.port), info())
    threading.Thread(target=_report_load, args=(heartbeat, info, stop), daemon=True).start()
    log.info("attention replica %s serving on %s (placement v%d)", args.replica_id, server.address, placement.version)
    stop.wait()
    _drain(loop, server, args.drain_timeout)
    heartbeat.stop()
    server.stop(grace=2)
    loop.stop()
    transport.close()
    return 0


def _shard_addresses(registry: Registry, args, version: int) -> dict[int, str]:
    """Wait until every shard of the placement is registered; shard id -> address."""
    deadline = time.monotonic() + args.shard_wait
    while True:
        shards = [s for s in registry.wait_for("expert", args.expert_shards, args.shard_wait)
                  if s.info.get("placement_version") == version]
        if len(shards) >= args.expert_shards:
            return {int(s.service_id): s.address for s in shards}
        if time.monotonic() > deadline:
            raise TimeoutError(f"expert shards serving placement v{version}: {len(shards)} of {args.expert_shards}")
        time.sleep(0.2)


def _live_shard_address(registry: Registry, shard: int, version: int) -> str | None:
    """Where shard ``shard`` serving placement ``version`` is registered now (after a restart, say)."""
    return next((s.address for s in registry.live("expert")
                 if s.service_id == str(shard) and s.info.get("placement_version") == version), None)


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
