"""Discovery and liveness: services register in Redis with a TTL and keep it alive by heartbeats.

A service's hash ``keys.service(kind, id)`` holds its ``address``, ``pid`` and ``info`` (JSON: capacity,
placement version, ...) and expires ``ttl_s`` after the last heartbeat; ``keys.services(kind)``
lists the ids that registered. A service that stops heartbeating (crashed, hung, partitioned)
drops out of ``live()`` once its hash expires; readers prune such ids from the set.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass

import redis

from epserve.services.cluster.keys import Keys, text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceInfo:
    """One live service as the registry knows it."""

    kind: str                 # "router" | "attention" | "expert"
    service_id: str
    address: str              # host:port of its gRPC server
    info: dict                # what it advertises (capacity, placement version, ...)
    pid: int | None = None    # its process id on its host (``epserve up`` matches restarts by it)


class Heartbeat:
    """A registration kept alive by a daemon thread that rewrites the hash and its TTL every interval."""

    def __init__(self, client: redis.Redis, keys: Keys, kind: str, service_id: str, address: str, info: dict,
                 ttl_s: float, interval_s: float):
        self._client, self._keys = client, keys
        self.kind, self.service_id, self.address = kind, service_id, address
        self._info = dict(info)
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._interval_s = interval_s
        self._lock = threading.Lock()          # one write at a time, so the newest info lands last
        self._stopped = threading.Event()
        self._write()                          # registered (or failing loudly) before register() returns
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{kind}-{service_id}", daemon=True)
        self._thread.start()

    @property
    def info(self) -> dict:
        return dict(self._info)

    def update(self, info: dict) -> None:
        """Replace the advertised info and write it now (not only at the next beat)."""
        with self._lock:
            self._info = dict(info)
        self._write()

    def stop(self, deregister: bool = True) -> None:
        """Stop beating; with ``deregister`` remove the service now, else let its hash expire."""
        self._stopped.set()
        self._thread.join()
        if deregister:
            pipe = self._client.pipeline()
            pipe.delete(self._keys.service(self.kind, self.service_id))
            pipe.srem(self._keys.services(self.kind), self.service_id)
            try:
                pipe.execute()
            except redis.RedisError as err:      # shutting down must not need Redis: the entry expires
                log.warning("%s %s: deregistering failed (%s); the entry expires with its TTL",
                            self.kind, self.service_id, err)

    def _write(self) -> None:
        key = self._keys.service(self.kind, self.service_id)
        with self._lock:
            pipe = self._client.pipeline()       # MULTI: the id joins the set together with its hash
            pipe.hset(key, mapping={"address": self.address, "info": json.dumps(self._info), "pid": os.getpid()})
            pipe.pexpire(key, self._ttl_ms)
            pipe.sadd(self._keys.services(self.kind), self.service_id)
            pipe.execute()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            try:
                self._write()
            except redis.RedisError as e:        # Redis briefly away: keep trying until stopped
                log.warning("heartbeat of %s %s failed: %s", self.kind, self.service_id, e)


class Registry:
    """Registers services and finds live ones."""

    def __init__(self, client: redis.Redis, keys: Keys):
        self.client, self.keys = client, keys

    def register(self, kind: str, service_id: str, address: str, info: dict, ttl_s: float = 3.0,
                 interval_s: float = 1.0) -> Heartbeat:
        """Write the service's hash now and keep refreshing it every ``interval_s`` (< ``ttl_s``)."""
        self.keys.services(kind)                 # validates kind
        if not 0 < interval_s < ttl_s:
            raise ValueError(f"need 0 < interval_s < ttl_s, got interval_s={interval_s}, ttl_s={ttl_s}")
        if not service_id or not address:
            raise ValueError(f"service_id and address must be non-empty, got {service_id!r}, {address!r}")
        return Heartbeat(self.client, self.keys, kind, service_id, address, info, ttl_s, interval_s)

    def live(self, kind: str) -> list[ServiceInfo]:
        """Services of ``kind`` whose hash has not expired, sorted by id; expired ids are pruned.

        An id pruned just as its service re-registers is added back by that service's next beat.
        """
        ids = sorted(text(i) for i in self.client.smembers(self.keys.services(kind)))
        pipe = self.client.pipeline(transaction=False)
        for service_id in ids:
            pipe.hgetall(self.keys.service(kind, service_id))
        found, dead = [], []
        for service_id, fields in zip(ids, pipe.execute()):
            fields = {text(k): text(v) for k, v in fields.items()}
            if "address" not in fields:
                dead.append(service_id)
                continue
            pid = int(fields["pid"]) if "pid" in fields else None
            found.append(ServiceInfo(kind, service_id, fields["address"], json.loads(fields.get("info", "{}")), pid))
        if dead:
            self.client.srem(self.keys.services(kind), *dead)
        return found

    def wait_for(self, kind: str, count: int, timeout_s: float, poll_s: float = 0.05) -> list[ServiceInfo]:
        """Poll until at least ``count`` services of ``kind`` are live; TimeoutError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            services = self.live(kind)
            if len(services) >= count:
                return services
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{len(services)} of {count} {kind} services live after {timeout_s} s: "
                                   f"{[s.service_id for s in services]}")
            time.sleep(poll_s)
