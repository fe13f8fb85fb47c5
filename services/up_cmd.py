"""``epserve up``: a whole cluster on this machine, each service its own process, on loopback.

Embedded Redis (append-only file, restarted when it dies; ACL users with random passwords, one per
component, handed to each service in a 0600 file, never on a command line) and a throwaway CA
(``cluster_ca``) whose certificates make every internal call mutual TLS -> S expert shards -> N
attention replicas (they wait for the shards) -> the router on ``--port``. Prints the endpoint once every service answers its health check. On Ctrl-C or
SIGTERM every child gets SIGTERM (then SIGKILL after a grace period), Redis stops and its
temporary directory goes; children also die with this process (PR_SET_PDEATHSIG). A service that
exits while the cluster runs is restarted (up to ``MAX_RESTARTS`` times each): it re-registers in
Redis and its peers find it there. ``--state-file`` tells other programs (the load-test harness's
fault injection, tests) what runs where, so that nobody parses command lines or this banner.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import redis

from epserve.services.cluster.cluster_ca import write_cluster_certificates
from epserve.services.cluster.cluster_tls import ADMIN
from epserve.services.cluster.keys import SERVICE_KINDS, Keys
from epserve.services.cluster.redis_server import EmbeddedRedis
from epserve.services.config import UpConfig, kind_of, serve_command, service_id
from epserve.services.flags import add_flags, from_args
from epserve.services.up_state import UpState
from epserve.services.usage import UsageError

_PR_SET_PDEATHSIG = 1
MAX_RESTARTS = 5


def add_up_parser(commands) -> None:
    p = commands.add_parser("up", help="run a whole cluster on this machine", description=__doc__)
    add_flags(p, UpConfig)
    p.set_defaults(handler=lambda args: run_up(from_args(UpConfig, args)))


def run_up(config: UpConfig) -> int:
    from epserve.services.model.tiny import resolve_model     # torch: only when a cluster starts

    try:
        resolve_model(config.model)                    # builds `tiny` once, before the children race for it
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    stop = {"signal": False}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.update(signal=True))
    cluster = f"up-{uuid.uuid4().hex[:8]}"
    with (EmbeddedRedis(persistent=True, acl_keys=Keys(cluster)) as redis_server,
          tempfile.TemporaryDirectory(prefix="epserve-up-tls-") as tls_dir):
        certificates = write_cluster_certificates(tls_dir, (*SERVICE_KINDS, ADMIN))
        state = UpState(redis_server, cluster, f"127.0.0.1:{config.port}", config.state_file,
                        f"http://127.0.0.1:{config.http_port}/v1", admin_tls=certificates[ADMIN])
        try:
            _start_cluster(config, state, _credentials(redis_server, certificates), stop)
            print(f"epserve up: {config.model} serving at {state.endpoint} (gRPC) and {state.http_endpoint} "
                  f"(OpenAI-compatible HTTP) "
                  f"({config.attention} attention, {config.expert_shards} expert shards, "
                  f"{config.redundant_experts} redundant experts; state in Redis 127.0.0.1:{redis_server.port} "
                  f"cluster {cluster}). Ctrl-C stops it.", flush=True)
            return _supervise(state, stop, config.restart_delay)
        except (TimeoutError, RuntimeError) as err:
            print(f"epserve up: {err}", file=sys.stderr)
            return 1
        finally:
            _stop_children([s.process for s in state.services])
            state.remove()


def _credentials(redis_server: EmbeddedRedis, certificates: dict[str, tuple[str, str, str]]) -> dict[str, dict]:
    """kind -> its services' Redis user (URL and password file) and certificate files (CA, cert, key)."""
    return {kind: {"redis": redis_server.user_url(kind), "redis_password_file": redis_server.password_file(kind),
                   **dict(zip(("cluster_ca", "cluster_cert", "cluster_key"), certificates[kind]))}
            for kind in SERVICE_KINDS}


def _start_cluster(config: UpConfig, state: UpState, credentials: dict[str, dict], stop: dict) -> None:
    """Start the services kind by kind, each kind once the previous one is registered."""
    services = config.services(credentials, state.cluster)
    for kind in ("expert", "attention", "router"):
        for service in (s for s in services if kind_of(s) == kind):
            state.add(kind, service_id(service), _spawn(serve_command(service)))
        _wait_registered(state, kind, config.startup_timeout, stop)
    _wait_healthy(state.endpoint, config.startup_timeout)
    state.set_ready()


def _supervise(state: UpState, stop: dict, restart_delay_s: float) -> int:
    """Restart services that exit (after ``restart_delay_s``) until a signal comes; give up on one that
    keeps exiting."""
    exited: dict[int, float] = {}                     # pid -> when it was seen gone
    while not stop["signal"]:
        if not state.redis_server.alive():
            print("epserve up: redis exited; restarting it (its append-only file keeps the cluster's state)",
                  file=sys.stderr, flush=True)
            state.redis_server.restart()
            state.changed()
        for service in state.services:
            if service.process.poll() is None:
                continue
            name = f"{service.kind} {service.service_id}"
            if service.restarts >= MAX_RESTARTS:
                print(f"epserve up: {name} exited {MAX_RESTARTS + 1} times; stopping", file=sys.stderr)
                return 1
            if time.monotonic() < exited.setdefault(service.process.pid, time.monotonic()) + restart_delay_s:
                continue
            print(f"epserve up: {name} exited with status {service.process.returncode}; restarting",
                  file=sys.stderr, flush=True)
            state.restarted(service, _spawn(list(service.process.args)))
        try:
            state.refresh()
        except redis.RedisError:                      # Redis restarting: look again next round
            pass
        time.sleep(0.2)
    return 0


def _spawn(command: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_registered(state: UpState, kind: str, timeout_s: float, stop: dict) -> None:
    """Until every ``kind`` service is registered (by its own pid); a service that exits fails start-up."""
    deadline = time.monotonic() + timeout_s
    while not state.registered(kind):
        if stop["signal"]:
            raise RuntimeError("interrupted during start-up")
        exited = next((s for s in state.services if s.process.poll() is not None), None)
        if exited:
            raise RuntimeError(f"{exited.kind} {exited.service_id} exited during start-up "
                               f"(status {exited.process.returncode})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{kind} services not up after {timeout_s} s")
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
