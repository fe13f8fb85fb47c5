"""Cluster state kept in Redis: placement versions and expert load (request records: ``requests``).

- ``PlacementStore``: versioned placements; ``choose_placement`` makes every service starting
  together serve one version (it reuses the current one when it fits, else one service, holding a
  lock, builds and publishes a new one from load stats, a profile file, or uniform load).
- ``LoadStats``: expert shards flush per-slot token counts; placement reads per-expert totals.
"""
from __future__ import annotations

import collections
import json
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import redis
import torch

from epserve.services.cluster.keys import Keys, text
from epserve.services.cluster.placement import EMPTY, Placement, build_placement
from epserve.services.cluster.placement_versions import current_version, placement_json


# ---- placement ---------------------------------------------------------------------------------
_COMMIT = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then redis.call('SET', KEYS[1], ARGV[1]) end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
"""  # KEYS: placement:current, placement:pending; ARGV: v. `current` only moves forward.

_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""  # delete the lock only if this holder's token is still in it (it may have expired and moved on)

READY_TTL_S = 3600                   # a version's ready set outlives any switch


class PlacementStore:
    """Placements by version; ``current`` is the newest committed, ``pending`` one proposed for a switch.

    A switch is two-phase: the controller ``propose``s v (pending), every shard that holds slots in
    it loads them and ``mark_ready``s, then the controller ``commit``s v (current) or ``abandon``s it.
    ``publish`` stores and commits at once (a cluster's first placement, before anything serves).
    """

    def __init__(self, client: redis.Redis, keys: Keys):
        self.client, self.keys = client, keys
        self._commit = client.register_script(_COMMIT)

    def _store(self, placement: Placement) -> Placement:
        """Store ``placement`` under the next version (its own version is ignored)."""
        stored = replace(placement, version=int(self.client.incr(self.keys.placement_counter)))
        self.client.set(self.keys.placement(stored.version), stored.to_json())
        return stored

    def publish(self, placement: Placement) -> Placement:
        """Store ``placement`` under the next version and make it current."""
        published = self._store(placement)
        self.commit(published.version)
        return published

    def propose(self, placement: Placement) -> Placement:
        """Store ``placement`` under the next version as the pending one (not served until committed)."""
        proposed = self._store(placement)
        self.client.set(self.keys.placement_pending, proposed.version)
        return proposed

    def commit(self, version: int) -> None:
        """Make ``version`` current (if newer) and no longer pending."""
        self._commit(keys=[self.keys.placement_current, self.keys.placement_pending], args=[version])

    def abandon(self, version: int) -> None:
        """Drop ``version`` as the pending one (shards free what they loaded for it)."""
        pipe = self.client.pipeline()
        pipe.watch(self.keys.placement_pending)
        if text(pipe.get(self.keys.placement_pending) or b"") == str(version):
            pipe.multi()
            pipe.delete(self.keys.placement_pending)
            pipe.execute()
        pipe.reset()

    def pending_version(self) -> int | None:
        version = self.client.get(self.keys.placement_pending)
        return None if version is None else int(version)

    def mark_ready(self, version: int, shard: int) -> None:
        pipe = self.client.pipeline()
        pipe.sadd(self.keys.placement_ready(version), shard)
        pipe.expire(self.keys.placement_ready(version), READY_TTL_S)
        pipe.execute()

    def ready(self, version: int) -> set[int]:
        """The shards that loaded ``version``'s slots."""
        return {int(s) for s in self.client.smembers(self.keys.placement_ready(version))}

    def current(self) -> Placement | None:
        version = current_version(self.client, self.keys)
        return None if version is None else self.get(version)

    def get(self, version: int) -> Placement:
        return Placement.from_dict(placement_json(self.client, self.keys, version))


def _fits(placement: Placement | None, num_experts: int, num_shards: int, redundant: int,
          moe_layers: tuple[int, ...]) -> bool:
    """Whether ``placement`` has the shape asked for: experts, shards, layers, and slots (E + R used)
    unless it is a fail-over placement (some shard holds nothing: the controller re-plans it)."""
    if placement is None:
        return False
    if (placement.num_experts, placement.num_shards, placement.moe_layers) != (num_experts, num_shards, moe_layers):
        return False
    if len(placement.shards_in_use()) < num_shards:
        return True
    slots_per_shard = -(-(num_experts + redundant) // num_shards)
    used = (placement.physical_to_logical != EMPTY).sum(dim=1)                       # [rows]
    return placement.slots_per_shard == slots_per_shard and bool((used == num_experts + redundant).all())


def choose_placement(client: redis.Redis, keys: Keys, *, num_experts: int, num_shards: int, redundant: int,
                     moe_layers: Sequence[int], profile_path: str | Path | None = None,
                     lock_ttl_s: float = 30.0, timeout_s: float = 60.0) -> Placement:
    """The placement every service should serve: the current one if it fits, else a new published one.

    The new one balances Redis load stats when there are any, else the profile file when given,
    else uniform load. One caller at a time builds (under ``keys.placement_lock``); the others
    wait and then find its placement current.
    """
    store, layers = PlacementStore(client, keys), tuple(moe_layers)
    token, deadline = uuid.uuid4().hex, time.monotonic() + timeout_s
    while True:
        current = store.current()
        if _fits(current, num_experts, num_shards, redundant, layers):
            return current
        if client.set(keys.placement_lock, token, nx=True, px=round(lock_ttl_s * 1000)):
            break
        if time.monotonic() >= deadline:
            raise TimeoutError(f"placement lock {keys.placement_lock} still held after {timeout_s} s")
        time.sleep(0.05)
    try:
        current = store.current()            # published by the previous holder just before we got the lock
        if _fits(current, num_experts, num_shards, redundant, layers):
            return current
        load = LoadStats(client, keys).logical_load(layers, num_experts)
        if load is None and profile_path is not None:
            load = read_load_profile(profile_path, layers, num_experts)
        return store.publish(build_placement(num_experts, num_shards, redundant, layers, load))
    finally:
        client.register_script(_RELEASE_LOCK)(keys=[keys.placement_lock], args=[token])


def read_load_profile(path: str | Path, moe_layers: Sequence[int], num_experts: int) -> torch.Tensor:
    """``{"moe_layers": {"3": [E counts], ...}}`` -> load [len(moe_layers), E] float64.

    Layers missing from the file get uniform load (ones); layers not in ``moe_layers`` are ignored.
    """
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"load profile {path}: cannot read JSON: {e}") from e
    layers = raw.get("moe_layers") if isinstance(raw, dict) else None
    if not isinstance(layers, dict):
        raise ValueError(f"load profile {path}: expected an object with a 'moe_layers' object")
    load = torch.ones(len(moe_layers), num_experts, dtype=torch.float64)
    for row, layer in enumerate(moe_layers):
        counts = layers.get(str(layer))
        if counts is None:
            continue
        valid = (isinstance(counts, list) and len(counts) == num_experts
                 and all(isinstance(c, (int, float)) and not isinstance(c, bool) and c >= 0 for c in counts))
        if not valid:
            raise ValueError(f"load profile {path}: layer {layer} must be a list of {num_experts} "
                             f"non-negative numbers")
        load[row] = torch.tensor(counts, dtype=torch.float64)
    return load


# ---- expert load ---------------------------------------------------------------------------------
class LoadStats:
    """Token counters: per physical slot (what each copy served) and per logical expert (placement input),
    the latter also per time bucket, so that a sliding window of recent load can be read."""

    BUCKET_S = 60                    # seconds per load bucket
    KEEP_BUCKETS = 60                # buckets kept (an hour): the longest window

    def __init__(self, client: redis.Redis, keys: Keys):
        self.client, self.keys = client, keys

    def flush(self, shard: int, placement: Placement, counts: torch.Tensor, now: float | None = None) -> None:
        """Add ``counts [len(moe_layers), slots_per_shard]`` int64 (tokens per local slot) in one pipeline,
        into the totals and into the bucket of ``now`` (default: the time)."""
        rows, slots = len(placement.moe_layers), placement.slots_per_shard
        if tuple(counts.shape) != (rows, slots):
            raise ValueError(f"counts must be [{rows}, {slots}], got {tuple(counts.shape)}")
        first = shard * slots
        experts = placement.physical_to_logical[:, first:first + slots]                 # [rows, slots]
        bucket = self._bucket(now)
        pipe = self.client.pipeline()
        for row, local in (counts != 0).nonzero().tolist():
            expert = int(experts[row, local])
            if expert == EMPTY:
                continue
            layer, tokens = placement.moe_layers[row], int(counts[row, local])
            pipe.hincrby(self.keys.slot_load(shard), f"{placement.version}:{layer}:{first + local}", tokens)
            pipe.hincrby(self.keys.expert_load(layer), str(expert), tokens)
            pipe.hincrby(self.keys.expert_load_bucket(layer, bucket), str(expert), tokens)
            pipe.expire(self.keys.expert_load_bucket(layer, bucket), self.BUCKET_S * (self.KEEP_BUCKETS + 1))
        if len(pipe):
            pipe.execute()

    def _bucket(self, now: float | None) -> int:
        return int((time.time() if now is None else now) // self.BUCKET_S)

    def logical_load(self, moe_layers: Sequence[int], num_experts: int, window_s: float | None = None,
                     now: float | None = None) -> torch.Tensor | None:
        """Tokens per logical expert [len(moe_layers), E] float64 since the start, or over the last
        ``window_s`` seconds (whole buckets, the current one included); None when nothing was counted."""
        if window_s is None:
            keys = [[self.keys.expert_load(layer)] for layer in moe_layers]
        else:
            last = self._bucket(now)
            count = min(self.KEEP_BUCKETS, max(1, -(-int(window_s) // self.BUCKET_S)))
            keys = [[self.keys.expert_load_bucket(layer, b) for b in range(last - count + 1, last + 1)]
                    for layer in moe_layers]
        pipe = self.client.pipeline(transaction=False)
        for layer_keys in keys:
            for key in layer_keys:
                pipe.hgetall(key)
        replies = iter(pipe.execute())
        load = torch.zeros(len(moe_layers), num_experts, dtype=torch.float64)
        seen = False
        for row, layer_keys in enumerate(keys):
            fields = collections.Counter()
            for _ in layer_keys:
                fields.update({expert: int(tokens) for expert, tokens in next(replies).items()})
            for expert, tokens in fields.items():
                expert = int(expert)
                if 0 <= expert < num_experts:          # ids from another model shape are ignored
                    load[row, expert] = int(tokens)
                    seen = True
        return load if seen else None

    def slot_load(self, shard: int, version: int) -> dict[tuple[int, int], int]:
        """(moe_layer, global slot) -> tokens that slot on ``shard`` served under placement ``version``."""
        fields = self.client.hgetall(self.keys.slot_load(shard))
        load = {}
        for field, tokens in fields.items():
            served_version, layer, slot = text(field).split(":")
            if int(served_version) == version:
                load[int(layer), int(slot)] = int(tokens)
        return load
