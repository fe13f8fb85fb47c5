"""Admission: which attention replica takes a request, and the bounded queue when all are full.

Replicas come from the Redis registry (refreshed at most every ``refresh_s``); each advertises its
capacity (``max_num_seqs``) and, in its heartbeat, its KV blocks in use and queue length. The router
adds its own count of requests it has in flight on each replica, which is fresher than any
heartbeat. A replica is full when the router's in-flight count reaches its capacity; the least
loaded replica that is not full wins (load = in-flight / capacity + KV blocks used / total).
When every replica is full a request waits, up to ``max_queue`` waiting requests; beyond that it
is refused.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import redis

from epserve.services.cluster.registry import Registry, ServiceInfo


class QueueFull(Exception):
    """Every replica is full and the admission queue is at its bound."""


class NoReplicas(Exception):
    """No attention replica is registered and alive."""


class WaitCancelled(Exception):
    """The caller gave up while its request was queued."""


@dataclass(frozen=True)
class Replica:
    service_id: str
    address: str


class Admission:
    def __init__(self, registry: Registry, max_queue: int = 64, refresh_s: float = 0.5):
        self.registry, self.max_queue, self.refresh_s = registry, max_queue, refresh_s
        self._cond = threading.Condition()
        self._in_flight: dict[str, int] = {}
        self._waiting = 0
        self._replicas: list[ServiceInfo] = []
        self._refreshed = 0.0

    def acquire(self, timeout_s: float | None, cancelled: threading.Event | None = None) -> Replica:
        """Pick a replica, waiting in the bounded queue while all are full (and ``cancelled`` is not set)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            replica = self._pick()
            if replica is not None:
                return replica
            if self._waiting >= self.max_queue:
                raise QueueFull(f"all attention replicas are full and {self._waiting} requests are queued")
            self._waiting += 1
            try:
                while replica is None:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError("deadline passed while queued for an attention replica")
                    if cancelled is not None and cancelled.is_set():
                        raise WaitCancelled("the caller went away while queued")
                    self._cond.wait(timeout=min(self.refresh_s, remaining) if remaining else self.refresh_s)
                    replica = self._pick()
                return replica
            finally:
                self._waiting -= 1

    @property
    def waiting(self) -> int:
        """Requests in the queue now."""
        return self._waiting

    def release(self, replica: Replica) -> None:
        with self._cond:
            self._in_flight[replica.service_id] -= 1
            self._cond.notify()

    def replicas(self) -> list[ServiceInfo]:
        with self._cond:
            self._refresh()
            return list(self._replicas)

    def _pick(self) -> Replica | None:
        self._refresh()
        if not self._replicas:
            raise NoReplicas("no attention replica is registered")
        candidates = [(self._load(r), r) for r in self._replicas if not r.info.get("draining")]
        candidates = [(load, r) for load, r in candidates if self._in_flight.get(r.service_id, 0) < _capacity(r)]
        if not candidates:
            return None
        _, best = min(candidates, key=lambda item: (item[0], item[1].service_id))
        self._in_flight[best.service_id] = self._in_flight.get(best.service_id, 0) + 1
        return Replica(best.service_id, best.address)

    def _load(self, replica: ServiceInfo) -> float:
        info = replica.info
        kv = info.get("kv_blocks_used", 0) / max(info.get("kv_blocks_total", 1), 1)
        return self._in_flight.get(replica.service_id, 0) / _capacity(replica) + kv

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._refreshed >= self.refresh_s or not self._replicas:
            try:
                self._replicas = self.registry.live("attention")
            except redis.RedisError as err:               # Redis away: the replicas we know go on serving
                if not self._replicas:
                    raise NoReplicas(f"no attention replica known, and the registry is unreachable: {err}") from None
            self._refreshed = now


def _capacity(replica: ServiceInfo) -> int:
    return max(1, int(replica.info.get("max_num_seqs", 1)))
