"""Every service's settings: one dataclass per service, the only place its defaults are written.

    ServiceConfig            what every ``epserve serve`` service takes (Redis, cluster, model, address)
    ├── RouterConfig         ``epserve serve router``
    └── ModelServiceConfig   services that load weights and serve the cluster's placement
        ├── AttentionConfig  ``epserve serve attention`` (and every EngineConfig setting)
        └── ExpertConfig     ``epserve serve expert``
    UpConfig                 ``epserve up``: the cluster's shape; its services take their defaults here
                             (and serve /metrics on free ports, advertised in the registry)

Flags come from the fields (``epserve.services.flags``); ``epserve up`` and the Ray Serve app build
these objects and start ``epserve serve KIND`` with ``to_argv(config)``; the Helm chart renders
the same flags (tests/deploy/test_chart.py parses them back into these classes). No torch here:
the router and the command line import it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, fields

from epserve.services.engine.config import EngineConfig
from epserve.services.flags import same_as, setting, to_argv

DTYPES = ("float32", "bfloat16", "float16")
TRANSPORTS = ("auto", "grpc", "local", "nixl")      # the attention -> expert data path (cluster.transport)


@dataclass(kw_only=True)
class ServiceConfig:
    redis: str | None = setting(None, help="Redis URL redis://[USER@]HOST:PORT/DB (default: $EPSERVE_REDIS_URL, "
                                           "which keeps a password in it out of the process list)")
    redis_password_file: str | None = setting(None, help="file holding the Redis password of the URL's (ACL) user")
    cluster: str = setting("default", help="cluster name: the prefix of every Redis key")
    model: str = setting("tiny", help="'tiny' (built in, made locally) or a local checkpoint directory")
    host: str = setting("127.0.0.1", help="address to bind (0.0.0.0 in a pod)")
    port: int = setting(0, low=0, high=65535, help="port to bind (0: any free port)")
    advertise_host: str | None = setting(
        None, help="host other services use to reach this one (default: --host; the pod IP on Kubernetes)")
    verbose: bool = setting(False, help="libraries log at INFO too")
    metrics_port: int | None = setting(None, low=0, high=65535, help="serve Prometheus metrics at /metrics on this "
                                                                      "port (0: any free port; default: not served)")
    cluster_ca: str | None = setting(None, help="PEM CA certificate of the internal plane: with --cluster-cert and "
                                                "--cluster-key, calls between services are mutual TLS and attention "
                                                "replicas and expert shards refuse callers without a certificate it "
                                                "signed (docs/security.md)")
    cluster_cert: str | None = setting(None, help="PEM certificate of this service, signed by --cluster-ca, naming "
                                                  "KIND.epserve.internal (KIND: router, attention or expert)")
    cluster_key: str | None = setting(None, help="PEM private key of --cluster-cert")
    health_port: int | None = setting(None, low=0, high=65535, help="also serve grpc.health.v1 alone, in plaintext, "
                                                                    "on this port (kubelet's gRPC probes present no "
                                                                    "client certificate; default: not served)")

    def advertised(self, port: int) -> str:
        return f"{self.advertise_host or self.host}:{port}"

    def health_address(self) -> str | None:
        """Where the plaintext health-only server binds (None: not served)."""
        return None if self.health_port is None else f"{self.host}:{self.health_port}"


@dataclass(kw_only=True)
class ModelServiceConfig(ServiceConfig):
    device: str | None = setting(None, help="cpu or cuda[:N] (default: cuda if available)")
    dtype: str | None = setting(None, choices=DTYPES, help="default: bfloat16 on CUDA, float32 on the CPU")
    expert_shards: int = setting(1, low=1, help="S: expert shard services in the cluster")
    redundant_experts: int = setting(0, low=0, help="R: extra slots for copies of hot experts")
    load_profile: str | None = setting(None, help="JSON expert-load profile used when Redis has no statistics")


@dataclass(kw_only=True)
class RouterConfig(ServiceConfig):
    router_id: str | None = setting(None, help="unique id (default: random)")
    max_queue: int = setting(256, low=0, help="requests that may wait when every replica is full")
    max_request_bytes: int = setting(4 << 20, low=1, help="largest GenerateRequest accepted")
    max_concurrent_rpcs: int = setting(
        1024, low=1, help="calls served at once; beyond it a call is refused with RESOURCE_EXHAUSTED")
    api_keys_file: str | None = setting(
        None, help="file of API keys, one per line: clients must send 'authorization: Bearer KEY'")
    tls_cert: str | None = setting(None, help="PEM certificate chain: serve TLS (with --tls-key)")
    tls_key: str | None = setting(None, help="PEM private key of --tls-cert")
    rate_limit: float = setting(0.0, low=0, help="requests per second each API key may start, averaged (a token "
                                                 "bucket in Redis: one limit for all routers; 0: none)")
    rate_burst: int = setting(20, low=1, help="requests an API key may start at once above --rate-limit")
    http_port: int | None = setting(None, low=0, high=65535, help="serve the OpenAI-compatible HTTP API "
                                                                  "(/v1/completions, /v1/chat/completions) on this "
                                                                  "port (0: any free port; default: not served)")
    resume_attempts: int = setting(8, low=0, help="times one request is resubmitted, with the tokens it has "
                                                  "streamed, after its attention replica went away (0.25 s "
                                                  "backoff doubling to 2 s: 8 attempts span about 10 s)")


@dataclass(kw_only=True)
class AttentionConfig(EngineConfig, ModelServiceConfig):
    replica_id: str = setting(help="unique id of this replica in the cluster")
    transport: str = setting("auto", choices=TRANSPORTS,
                             help="the data path to each expert shard: local (shared memory, one host), nixl "
                                  "(NIXL one-sided writes, any network), grpc (protobuf messages), auto (local on "
                                  "this host, else nixl where installed, else grpc)")
    wire_dtype: str = setting("model", choices=("model", "fp8"),
                              help="activations to expert shards in the model dtype, or FP8 with 1x128 scales")
    shard_wait: float = setting(300.0, low=0, help="seconds to wait for the expert shards")
    hedge_after: float = setting(2.0, low=0, help="seconds an expert shard may take on one MoE layer before its "
                                                  "tokens are also sent to other copies of their experts, where "
                                                  "every one has a copy elsewhere (0: never)")
    step_retries: int = setting(16, low=0, help="a failed engine step (an expert shard gone) runs again after a "
                                                "backoff (0.25 s, doubling, at most 2 s: 16 retries wait about "
                                                "28 s in all); a request that was in more failed steps fails")
    max_waiting: int = setting(64, low=0, help="requests that may wait here beyond a full batch (--max-num-seqs); "
                                               "more are refused (RESOURCE_EXHAUSTED) and their router tries another "
                                               "replica, so that several routers cannot overfill one")
    drain_timeout: float = setting(30.0, low=0, help="on SIGTERM: seconds running requests get to finish "
                                                     "(when no other replica can take them over)")
    stall_timeout: float = setting(180.0, low=1, help="seconds the engine loop may have work and complete no step "
                                                      "before health says NOT_SERVING (the liveness probe then "
                                                      "restarts the replica)")

    def engine(self) -> EngineConfig:
        """The engine settings among these."""
        return EngineConfig(**{f.name: getattr(self, f.name) for f in fields(EngineConfig)})


@dataclass(kw_only=True)
class ExpertConfig(ModelServiceConfig):
    shard_id: int = setting(low=0, help="this shard's index in [0, --expert-shards)")
    flush_interval: float = setting(1.0, low=0.001, help="seconds between load-counter flushes")
    capacity: str = setting("1", help="relative speed: one number for this shard, or every shard's by shard id, "
                                      "comma-separated (the same list can go to every shard); the placement gives "
                                      "a shard load in proportion, and the coldest experts when it is slower")
    controller: bool = setting(True, help="run a placement controller here (the one holding the Redis lease "
                                          "leads): fail-over of dead shards and live rebalancing")
    rebalance_interval: float = setting(600.0, low=0, help="seconds between re-plans from the expert load "
                                                            "(0: only on `epserve placement rebalance`)")
    rebalance_threshold: float = setting(0.05, low=0, high=1, help="switch only when the re-plan raises the "
                                                                   "balancedness (mean / max shard load) by this much")
    rebalance_window: float = setting(600.0, low=60, help="seconds of expert load a re-plan balances (whole minutes)")
    ready_timeout: float = setting(300.0, low=1, help="seconds the shards get to load a new placement's slots "
                                                      "before the controller abandons it")

    def __post_init__(self):
        self.own_capacity()

    def own_capacity(self) -> float:
        """This shard's relative speed, from ``capacity``; ValueError naming --capacity when it is not one
        positive number or one per shard."""
        try:
            speeds = [float(part) for part in self.capacity.split(",")]
        except ValueError:
            raise ValueError(f"--capacity: expected a number or comma-separated numbers, got {self.capacity!r}") from None
        if len(speeds) not in (1, self.expert_shards) or not all(speed > 0 for speed in speeds):
            raise ValueError(f"--capacity: expected one positive number or {self.expert_shards} (one per shard), "
                             f"got {self.capacity!r}")
        return speeds[0] if len(speeds) == 1 else speeds[self.shard_id]


SERVICE_CONFIGS: dict[str, type[ServiceConfig]] = {
    "router": RouterConfig, "attention": AttentionConfig, "expert": ExpertConfig}


@dataclass(kw_only=True)
class UpConfig:
    """``epserve up``: the shape of a cluster on this machine; every other setting is its services'."""

    model: str = same_as(ServiceConfig, "model")
    attention: int = setting(1, low=1, help="attention replicas")
    expert_shards: int = setting(2, low=1, help="expert shard services")
    redundant_experts: int = setting(2, low=0, help="extra slots for copies of hot experts")
    port: int = setting(50051, low=0, high=65535, help="the router's port (the public endpoint)")
    http_port: int = setting(8000, low=1, high=65535, help="the router's OpenAI-compatible HTTP port")
    api_keys_file: str | None = same_as(RouterConfig, "api_keys_file")
    rate_limit: float = same_as(RouterConfig, "rate_limit")
    rate_burst: int = same_as(RouterConfig, "rate_burst")
    micro_batches: int = same_as(EngineConfig, "micro_batches")
    micro_batch_min_tokens: int = same_as(EngineConfig, "micro_batch_min_tokens")
    transport: str = same_as(AttentionConfig, "transport")
    device: str | None = same_as(ModelServiceConfig, "device")
    dtype: str | None = same_as(ModelServiceConfig, "dtype")
    rebalance_interval: float = same_as(ExpertConfig, "rebalance_interval")
    capacity: str = same_as(ExpertConfig, "capacity")
    startup_timeout: float = setting(300.0, low=0, help="seconds for every service to come up")
    restart_delay: float = setting(0.0, low=0, help="seconds before a service that exited is started again (a "
                                                    "real checkpoint's shard takes minutes to load: this shows the "
                                                    "cluster meanwhile)")
    state_file: str | None = setting(
        None, help="write every service's kind, id, pid, address and restarts here as JSON (rewritten on each change)")
    verbose: bool = setting(False, help="services log at INFO")

    def services(self, credentials: dict[str, dict[str, str]], cluster: str) -> list[ServiceConfig]:
        """The configs of every service, in start order: expert shards, attention replicas, the router.
        ``credentials``: kind -> the settings that say where and who that kind's services are (``redis``,
        ``redis_password_file``, ``cluster_ca``, ``cluster_cert``, ``cluster_key``)."""
        common = dict(cluster=cluster, model=self.model, verbose=self.verbose, metrics_port=0)
        model = dict(common, device=self.device, dtype=self.dtype, expert_shards=self.expert_shards,
                     redundant_experts=self.redundant_experts)
        return ([ExpertConfig(**model, **credentials["expert"], shard_id=shard, rebalance_interval=self.rebalance_interval,
                              capacity=self.capacity)
                 for shard in range(self.expert_shards)]
                + [AttentionConfig(**model, **credentials["attention"], replica_id=f"attention-{replica}",
                                   micro_batches=self.micro_batches,
                                   micro_batch_min_tokens=self.micro_batch_min_tokens, transport=self.transport)
                   for replica in range(self.attention)]
                + [RouterConfig(**common, **credentials["router"], port=self.port, http_port=self.http_port,
                                api_keys_file=self.api_keys_file, rate_limit=self.rate_limit, rate_burst=self.rate_burst, router_id="router-0")])


def serve_command(config: ServiceConfig) -> list[str]:
    """The command line that runs ``config``'s service: ``python -m epserve.services.cli serve KIND --flag=value ...``."""
    return [sys.executable, "-m", "epserve.services.cli", "serve", kind_of(config), *to_argv(config)]


def kind_of(config: ServiceConfig) -> str:
    """``"router"``, ``"attention"`` or ``"expert"``."""
    return next(kind for kind, cls in SERVICE_CONFIGS.items() if isinstance(config, cls))


def service_id(config: ServiceConfig) -> str:
    """The id the service registers under in Redis."""
    if isinstance(config, ExpertConfig):
        return str(config.shard_id)
    if isinstance(config, AttentionConfig):
        return config.replica_id
    return config.router_id or ""
