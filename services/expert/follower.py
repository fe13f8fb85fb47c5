"""An expert shard's side of a live placement switch: hold what the controller asks, free what nobody uses.

Every ``poll_s`` the follower reads ``placement:current`` and ``placement:pending`` (``PlacementStore``)::

    a version current or pending that the shard does not hold -> load its slots (``ExpertShard.hold``,
        in this thread: the shard goes on serving what it holds) -> pending: mark this shard ready
    a version held that is neither                            -> release it once no live attention
        replica reports it (an abandoned proposal at once)

and advertises the versions held in the shard's registry entry (``placement_versions``), which is
how attention replicas find a shard that serves their version. Redis being away only delays this.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

import redis

from epserve.services.cluster.placement_versions import current_version
from epserve.services.cluster.registry import Registry
from epserve.services.cluster.state import PlacementStore
from epserve.services.expert.shard import ExpertShard

log = logging.getLogger(__name__)


class PlacementFollower:
    def __init__(self, shard: ExpertShard, store: PlacementStore, registry: Registry,
                 on_change: Callable[[list[int]], None], poll_s: float = 0.2):
        self.shard, self.store, self.registry, self.on_change, self.poll_s = shard, store, registry, on_change, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"shard-{shard.shard_id}-follower", daemon=True)

    def start(self) -> "PlacementFollower":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.follow()
            except redis.RedisError as err:                 # Redis away: keep serving what is held
                log.warning("expert shard %d: following the placement failed: %s", self.shard.shard_id, err)
            except Exception:                               # noqa: BLE001 - a bad version must not stop the thread
                log.exception("expert shard %d: following the placement failed", self.shard.shard_id)

    def follow(self) -> None:
        """One round: hold the current and pending versions, mark a pending one ready, release the rest."""
        current, pending = current_version(self.store.client, self.store.keys), self.store.pending_version()
        wanted = {v for v in (current, pending) if v is not None}
        held = set(self.shard.versions())
        for version in sorted(wanted - held):
            log.info("expert shard %d: loading the slots of placement v%d", self.shard.shard_id, version)
            self.shard.hold(self.store.get(version))
        if pending is not None:
            self.store.mark_ready(pending, self.shard.shard_id)
        in_use = {r.info.get("placement_version") for r in self.registry.live("attention")}
        for version in held - wanted:
            if current is None or version > current or version not in in_use:
                log.info("expert shard %d: releasing placement v%d", self.shard.shard_id, version)
                self.shard.release(version)
        if set(self.shard.versions()) != held:
            self.on_change(self.shard.versions())
