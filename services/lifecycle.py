"""Process lifecycle shared by every service's ``main``: logging, shutdown signals, Redis, the model's config.

No torch here (the router uses it); what the services that load weights add is in ``model_service``.
"""
from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass

import redis

from epserve.services.cluster.keys import Keys
from epserve.services.config import ServiceConfig
from epserve.services.model.catalog import model_config
from epserve.services.model.config import ModelConfig


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


@dataclass
class Service:
    """What every ``epserve serve`` service has once started: its shutdown event, Redis, the model's config."""

    stop: threading.Event
    client: redis.Redis
    keys: Keys
    model: ModelConfig


def redis_client(url: str) -> redis.Redis:
    """A client with explicit timeouts that retries a failed command briefly (about 0.35 s of backoff in
    all: a blip, not an outage) before raising. What must outlast an outage retries on its own (the
    token-log writer, the router's record writer, heartbeats); nothing on the token path waits on Redis."""
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeoutError
    from redis.retry import Retry

    return redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0,
                                retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 3),
                                retry_on_error=[RedisConnectionError, RedisTimeoutError])


def start_service(config: ServiceConfig) -> Service:
    """Logging, shutdown signals, Redis and the model's config (call from the main thread)."""
    setup_logging(config.verbose)
    stop = shutdown_event()
    client = redis_client(config.redis)
    client.ping()
    return Service(stop, client, Keys(config.cluster), model_config(config.model))
