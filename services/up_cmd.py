"""``epserve up``: a whole cluster on this machine, each service its own process, on loopback.

Embedded Redis -> S expert shards -> N attention replicas (they wait for the shards) -> the router
on ``--port``. Prints the endpoint once every service answers its health check. On Ctrl-C or
SIGTERM every child gets SIGTERM (then SIGKILL after a grace period), Redis stops and its
temporary directory goes; children also die with this process (PR_SET_PDEATHSIG). A service that
exits while the cluster runs is restarted (up to ``MAX_RESTARTS`` times each): it re-registers in
Redis and its peers find it there.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
import uuid

_PR_SET_PDEATHSIG = 1
MAX_RESTARTS = 5


def add_up_parser(commands) -> None:
    p = commands.add_parser("up", help="run a whole cluster on this machine", description=__doc__)
    p.add_argument("--model", default="tiny", help="'tiny' (built in) or a local checkpoint directory")
    p.add_argument("--attention", type=int, default=1, help="attention replicas")
    p.add_argument("--expert-shards", type=int, default=2, help="expert shard services")
    p.add_argument("--redundant-experts", type=int, default=2, help="extra slots for copies of hot experts")
    p.add_argument("--port", type=int, default=50051, help="the router's port (the public endpoint)")
    p.add_argument("--micro-batches", type=int, default=2, help="micro-batches in flight per attention replica")
    p.add_argument("--micro-batch-min-tokens", type=int, default=128, help="... each of at least this many tokens")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--verbose", action="store_true", help="services log at INFO")
    p.set_defaults(handler=run_up)


def run_up(args: argparse.Namespace) -> int:
    from epserve.services.cli import UsageError
    from epserve.services.cluster.redis_server import EmbeddedRedis
    from epserve.services.model.tiny import resolve_model

    try:
        resolve_model(args.model)                      # builds `tiny` once, before the children race for it
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    stop = {"signal": False}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.update(signal=True))
    children: list[subprocess.Popen] = []
    with EmbeddedRedis() as redis_server:
        try:
            cluster = f"up-{uuid.uuid4().hex[:8]}"
            _start_cluster(args, redis_server.url, cluster, children, stop)
            print(f"epserve up: {args.model} serving at 127.0.0.1:{args.port} "
                  f"({args.attention} attention, {args.expert_shards} expert shards, "
                  f"{args.redundant_experts} redundant experts; state in {redis_server.url} "
                  f"cluster {cluster}). Ctrl-C stops it.", flush=True)
            return _supervise(children, stop)
        except (TimeoutError, RuntimeError) as err:
            print(f"epserve up: {err}", file=sys.stderr)
            return 1
        finally:
            _stop_children(children)


def _start_cluster(args, redis_url: str, cluster: str, children: list, stop: dict) -> None:
    import redis

    from epserve.services.cluster.keys import Keys
    from epserve.services.cluster.registry import Registry

    registry = Registry(redis.Redis.from_url(redis_url), Keys(cluster))
    base = [sys.executable, "-m", "epserve.services.cli", "serve"]
    common = ["--redis", redis_url, "--cluster", cluster, "--model", args.model] + (["--verbose"] if args.verbose else [])
    model = ["--expert-shards", str(args.expert_shards), "--redundant-experts", str(args.redundant_experts)]
    model += (["--device", args.device] if args.device else []) + (["--dtype", args.dtype] if args.dtype else [])
    for shard in range(args.expert_shards):
        children.append(_spawn(base + ["expert"] + common + model + ["--shard-id", str(shard)]))
    _wait(registry, "expert", args.expert_shards, args, children, stop)
    for replica in range(args.attention):
        children.append(_spawn(base + ["attention"] + common + model +
                               ["--replica-id", f"attention-{replica}", "--micro-batches", str(args.micro_batches),
                                "--micro-batch-min-tokens", str(args.micro_batch_min_tokens)]))
    _wait(registry, "attention", args.attention, args, children, stop)
    children.append(_spawn(base + ["router"] + common + ["--port", str(args.port), "--router-id", "router-0"]))
    _wait(registry, "router", 1, args, children, stop)
    _wait_healthy(f"127.0.0.1:{args.port}", args.startup_timeout)


def _supervise(children: list[subprocess.Popen], stop: dict) -> int:
    """Restart services that exit until a signal comes; give up on one that keeps exiting."""
    restarts: dict[tuple, int] = {}
    while not stop["signal"]:
        for i, child in enumerate(children):
            if child.poll() is None:
                continue
            command = tuple(child.args)
            restarts[command] = restarts.get(command, 0) + 1
            name = _service_name(command)
            if restarts[command] > MAX_RESTARTS:
                print(f"epserve up: {name} exited {MAX_RESTARTS + 1} times; stopping", file=sys.stderr)
                return 1
            print(f"epserve up: {name} exited with status {child.returncode}; restarting", file=sys.stderr, flush=True)
            children[i] = _spawn(list(command))
        time.sleep(0.2)
    return 0


def _service_name(command: tuple) -> str:
    """'expert 1', 'attention attention-0', 'router router-0' from a ``serve`` command line."""
    kind = command[4]
    for flag in ("--shard-id", "--replica-id", "--router-id"):
        if flag in command:
            return f"{kind} {command[command.index(flag) + 1]}"
    return kind


def _spawn(command: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait(registry, kind: str, count: int, args, children: list, stop: dict) -> None:
    deadline = time.monotonic() + args.startup_timeout
    while len(registry.live(kind)) < count:
        if stop["signal"]:
            raise RuntimeError("interrupted during start-up")
        exited = [c for c in children if c.poll() is not None]
        if exited:
            raise RuntimeError(f"a service exited during start-up (status {exited[0].returncode}): {exited[0].args[4]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{kind} services not up after {args.startup_timeout} s")
        time.sleep(0.1)


def _wait_healthy(address: str, timeout_s: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s, wait_for_ready=True)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"router at {address} is not serving")


def _stop_children(children: list[subprocess.Popen], grace_s: float = 15.0) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
