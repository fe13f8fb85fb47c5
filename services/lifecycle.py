"""Process lifecycle shared by every service's ``main``: logging, shutdown signals, Redis, the model's config.

No torch here (the router uses it); what the services that load weights add is in ``model_service``.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import redis

from epserve.services.cluster.cluster_tls import ClusterTls
from epserve.services.cluster.keys import Keys
from epserve.services.config import ServiceConfig
from epserve.services.model.catalog import model_config
from epserve.services.model.config import ModelConfig

REDIS_URL_ENV = "EPSERVE_REDIS_URL"        # the Redis URL when --redis is not given (a Secret's, in a pod)


def setup_logging(verbose: bool) -> None:
    """epserve's own loggers at INFO (start-up lines); libraries at WARNING unless ``verbose``."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("epserve").setLevel(logging.INFO)


class ShutdownEvent(threading.Event):
    """An event that SIGTERM or SIGINT sets. Its ``wait()`` wakes every half second: a Python signal handler
    runs only when the main thread executes bytecode, and a signal the kernel hands to another thread (as
    it may right after a SIGCONT) does not interrupt a main thread blocked in a plain ``Event.wait()``."""

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is not None:
            return super().wait(timeout)
        while not super().wait(0.5):
            pass
        return True


def shutdown_event() -> ShutdownEvent:
    """An event set by SIGTERM or SIGINT (call from the main thread)."""
    stop = ShutdownEvent()
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
    tls: ClusterTls | None           # the internal plane's mutual TLS (None: plaintext)


def redis_of(config: ServiceConfig) -> redis.Redis:
    """The client of ``config``'s Redis: the URL from ``--redis`` or ``$EPSERVE_REDIS_URL``, the password
    from ``--redis-password-file`` (ValueError naming the setting when neither URL is there)."""
    url = config.redis or os.environ.get(REDIS_URL_ENV)
    if not url:
        raise ValueError(f"--redis: no Redis URL (give --redis, or set {REDIS_URL_ENV})")
    if config.redis and urllib.parse.urlsplit(config.redis).password:
        logging.getLogger(__name__).warning("--redis holds a password, visible in the process list: give it "
                                            "in --redis-password-file or the URL in $%s", REDIS_URL_ENV)
    password = None
    if config.redis_password_file:
        try:
            password = Path(config.redis_password_file).read_text().strip()
        except OSError as err:
            raise ValueError(f"--redis-password-file: cannot read {config.redis_password_file}: {err}") from None
    return redis_client(url, password)


def redis_client(url: str, password: str | None = None) -> redis.Redis:
    """A client with explicit timeouts that retries a failed command briefly (about 0.35 s of backoff in
    all: a blip, not an outage) before raising. What must outlast an outage retries on its own (the
    token-log writer, the router's record writer, heartbeats); nothing on the token path waits on Redis."""
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeoutError
    from redis.retry import Retry

    return redis.Redis.from_url(url, password=password, socket_timeout=5.0, socket_connect_timeout=2.0,
                                retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 3),
                                retry_on_error=[RedisConnectionError, RedisTimeoutError])


def start_service(config: ServiceConfig) -> Service:
    """Logging, shutdown signals, Redis and the model's config (call from the main thread)."""
    setup_logging(config.verbose)
    stop = shutdown_event()
    tls = ClusterTls.from_files(config.cluster_ca, config.cluster_cert, config.cluster_key)
    if tls is None:
        logging.getLogger(__name__).warning(
            "no --cluster-ca/--cluster-cert/--cluster-key: calls between services are plaintext, and an attention "
            "replica or expert shard serves whoever reaches its port (docs/security.md)")
    client = redis_of(config)
    client.ping()
    return Service(stop, client, Keys(config.cluster), model_config(config.model), tls)
