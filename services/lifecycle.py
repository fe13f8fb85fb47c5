"""Process lifecycle shared by every service's ``main``: logging, shutdown signals, common flags."""
from __future__ import annotations

import argparse
import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import redis
import torch

from epserve.services.cluster.keys import Keys
from epserve.services.cluster.placement import Placement
from epserve.services.cluster.state import choose_placement
from epserve.services.model.config import ModelConfig
from epserve.services.model.tiny import resolve_model


def setup_logging(verbose: bool) -> None:
    """epserve's own loggers at INFO (start-up lines); libraries at WARNING unless ``verbose``."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("epserve").setLevel(logging.INFO)


def shutdown_event() -> threading.Event:
    """An event set by SIGTERM or SIGINT (call from the main thread)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every ``epserve serve`` service takes."""
    parser.add_argument("--redis", required=True, help="Redis URL, e.g. redis://:password@redis:6379/0")
    parser.add_argument("--cluster", default="default", help="cluster name: the prefix of every Redis key")
    parser.add_argument("--model", default="tiny", help="'tiny' or a local checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in a pod)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (0: any free port)")
    parser.add_argument("--advertise-host", default=None,
                        help="host other services use to reach this one (default: --host; the pod IP on Kubernetes)")
    parser.add_argument("--verbose", action="store_true")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--expert-shards", type=int, default=1, help="S: expert shard services in the cluster")
    parser.add_argument("--redundant-experts", type=int, default=0, help="R: extra slots for copies of hot experts")
    parser.add_argument("--load-profile", default=None, help="JSON expert-load profile used when Redis has no statistics")


def device_and_dtype(args: argparse.Namespace) -> tuple[str, torch.dtype]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype:
        return device, getattr(torch, args.dtype)
    return device, torch.bfloat16 if device.startswith("cuda") else torch.float32


@dataclass
class Service:
    """What every ``epserve serve`` service has once started: its shutdown event, Redis, the model."""

    stop: threading.Event
    client: redis.Redis
    keys: Keys
    model_path: Path
    config: ModelConfig


def start_service(args: argparse.Namespace) -> Service:
    """Logging, shutdown signals, Redis, and the model's directory and config (call from the main thread)."""
    setup_logging(args.verbose)
    stop = shutdown_event()
    client, keys = connect(args)
    path = resolve_model(args.model)
    return Service(stop, client, keys, path, ModelConfig.from_hf(path))


def service_placement(args: argparse.Namespace, service: Service) -> Placement:
    """The placement every attention replica and expert shard of the cluster serves (from Redis)."""
    config = service.config
    return choose_placement(service.client, service.keys, num_experts=config.n_routed_experts,
                            num_shards=args.expert_shards, redundant=args.redundant_experts,
                            moe_layers=config.moe_layers, profile_path=args.load_profile)


def connect(args: argparse.Namespace) -> tuple[redis.Redis, Keys]:
    client = redis.Redis.from_url(args.redis)
    client.ping()
    return client, Keys(args.cluster)


def advertised(args: argparse.Namespace, port: int) -> str:
    return f"{args.advertise_host or args.host}:{port}"
