"""Ray Serve application: an epserve cluster as Serve deployments (``serve run deploy/ray/serve_config.yaml``).

Every replica supervises one ``epserve serve KIND`` process, the same command the Helm chart runs:
it starts it on a free port of its node with ``--advertise-host`` set to the node's IP (services
find each other through Redis, as on Kubernetes), returns from its constructor once the service
answers its gRPC health check, fails Serve's health check when the process has died (Serve then
replaces the replica) and stops it when Serve stops the replica.

    Redis (embedded, or an external URL) -> ExpertShard x S   (shard id = the replica's rank)
                                         -> Attention x N     (each waits for the S shards)
                                         -> Router (ingress)  (its gRPC port is the endpoint)

Resources come from the config file's ``ray_actor_options`` (``num_gpus: 1`` on ExpertShard and
Attention); in code every replica reserves nothing, so ``serve run epserve.services.ray_app:build_app`` runs
anywhere. A replica holding a GPU runs its service with ``--device cuda``, one without with ``--device cpu``.
The embedded Redis listens on its node's loopback, so it serves single-node Ray clusters only; give
``redis_url`` on more nodes.
"""
# no `from __future__ import annotations`: Serve reads build_app's annotation to validate `args:`
import asyncio
import ctypes
import signal
import subprocess
import time
from typing import Any

import grpc
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import BaseModel, Field, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from epserve.services.cluster.ports import free_port
from epserve.services.cluster.redis_server import EmbeddedRedis
from epserve.services.config import SERVICE_CONFIGS, ModelServiceConfig, ServiceConfig, serve_command
from epserve.services.flags import from_dict

_PR_SET_PDEATHSIG = 1


class ClusterArgs(BaseModel):
    """The application's arguments (``args:`` of the config file).

    ``expert``, ``attention`` and ``router`` set any other setting of that service by its config
    field name (``ExpertConfig``, ``AttentionConfig``, ``RouterConfig`` in ``epserve.services.config``),
    e.g. ``attention: {micro_batches: 3, wire_dtype: fp8}``; an unknown name is refused at build time.
    """

    model: str = ServiceConfig.model         # 'tiny' or a checkpoint directory present on every node
    cluster: str = "ray"                     # the prefix of every Redis key
    redis_url: str | None = None             # None: an embedded redis-server (single-node clusters)
    expert_shards: int = Field(2, ge=1)
    redundant_experts: int = Field(ModelServiceConfig.redundant_experts, ge=0)
    attention_replicas: int = Field(1, ge=1)
    router_port: int = 50051
    dtype: str | None = ModelServiceConfig.dtype   # float32|bfloat16|float16 (default: bfloat16 on GPUs)
    startup_timeout_s: float = 900.0         # loading a real checkpoint takes minutes
    expert: dict[str, Any] = {}
    attention: dict[str, Any] = {}
    router: dict[str, Any] = {}

    @model_validator(mode="after")
    def _check_settings(self) -> "ClusterArgs":
        for kind in SERVICE_CONFIGS:          # builds every config once, so a bad name fails `serve run`
            self.config(kind, redis="redis://check", service_id="0")
        return self

    def config(self, kind: str, *, redis: str, service_id: str, port: int = 0,
               advertise_host: str | None = None) -> ServiceConfig:
        """The config of one ``kind`` service of this application (what its Serve replica runs)."""
        fixed = dict(redis=redis, cluster=self.cluster, model=self.model, host="0.0.0.0", port=port,
                     advertise_host=advertise_host)
        if kind != "router":
            fixed.update(expert_shards=self.expert_shards, redundant_experts=self.redundant_experts, dtype=self.dtype,
                         device="cuda" if ray.is_initialized() and ray.get_gpu_ids() else "cpu")
        id_field = {"expert": "shard_id", "attention": "replica_id", "router": "router_id"}[kind]
        fixed[id_field] = int(service_id) if kind == "expert" else service_id
        return from_dict(SERVICE_CONFIGS[kind], getattr(self, kind), **fixed)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Redis:
    """An embedded redis-server for the cluster's state, on this replica's node."""

    def __init__(self):
        self._server = EmbeddedRedis().start()

    def url(self) -> str:
        return self._server.url

    def __del__(self):
        self._server.stop()


class _Service:
    """Supervises one ``epserve serve KIND`` child process of this replica."""

    async def _start(self, kind: str, service_id: str, redis: str | DeploymentHandle, args: ClusterArgs,
                     port: int = 0) -> None:
        redis_url = redis if isinstance(redis, str) else await redis.url.remote()
        node_ip = ray.util.get_node_ip_address()
        port = port or free_port("")
        config = args.config(kind, redis=redis_url, service_id=service_id, port=port, advertise_host=node_ip)
        self.kind, self.address = kind, f"{node_ip}:{port}"
        self.process = subprocess.Popen(serve_command(config), stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        await asyncio.to_thread(_wait_healthy, self.process, kind, f"127.0.0.1:{port}", args.startup_timeout_s)

    def check_health(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"epserve serve {self.kind} exited with status {self.process.returncode}")

    async def __del__(self):
        process = getattr(self, "process", None)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@serve.deployment(ray_actor_options={"num_cpus": 0})
class ExpertShard(_Service):
    async def __init__(self, redis: str | DeploymentHandle, args: ClusterArgs):
        context = serve.get_replica_context()
        if context.world_size != args.expert_shards:
            raise ValueError(f"ExpertShard has {context.world_size} replicas; expert_shards is {args.expert_shards}")
        await self._start("expert", str(context.rank.rank), redis, args)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Attention(_Service):
    async def __init__(self, redis: str | DeploymentHandle, args: ClusterArgs):
        replica_id = serve.get_replica_context().replica_id.unique_id
        await self._start("attention", f"attention-{replica_id}", redis, args)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Router(_Service):
    """The ingress. The shard and attention handles are bound only so that Serve deploys them too."""

    async def __init__(self, redis: str | DeploymentHandle, args: ClusterArgs, *components: DeploymentHandle):
        replica_id = serve.get_replica_context().replica_id.unique_id
        await self._start("router", f"router-{replica_id}", redis, args, port=args.router_port)

    def endpoint(self) -> str:
        """``host:port`` of the public gRPC API."""
        return self.address


def build_app(args: ClusterArgs) -> serve.Application:
    """The application for ``serve run`` / ``serve.run``: Redis (unless external), shards, attention, router."""
    redis = args.redis_url or Redis.bind()
    shards = ExpertShard.options(num_replicas=args.expert_shards).bind(redis, args)
    attention = Attention.options(num_replicas=args.attention_replicas).bind(redis, args)
    return Router.bind(redis, args, shards, attention)


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_healthy(process: subprocess.Popen, kind: str, address: str, timeout_s: float) -> None:
    """Return once ``address`` answers SERVING; raise if the process exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    request = health_pb2.HealthCheckRequest(service="")
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while process.poll() is None:
            if time.monotonic() > deadline:
                process.kill()
                raise TimeoutError(f"{kind} not healthy at {address} after {timeout_s} s")
            try:
                if stub.Check(request, timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise RuntimeError(f"{kind} exited during start-up with status {process.returncode}")
