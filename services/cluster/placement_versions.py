"""Published placements as Redis holds them (JSON), read without building tensors: no torch here.

``PlacementStore`` (``state``) turns them into ``Placement`` objects; the router only reports the
current version and its shard count.
"""
from __future__ import annotations

import json

import redis

from epserve.services.cluster.keys import Keys


def current_version(client: redis.Redis, keys: Keys) -> int | None:
    """The newest published placement version; None before the first."""
    version = client.get(keys.placement_current)
    return None if version is None else int(version)


def placement_json(client: redis.Redis, keys: Keys, version: int) -> dict:
    """The published placement ``version`` as stored (``Placement.to_json``); KeyError if absent."""
    text = client.get(keys.placement(version))
    if text is None:
        raise KeyError(f"placement version {version} is not in Redis ({keys.placement(version)})")
    return json.loads(text)


def current_summary(client: redis.Redis, keys: Keys) -> dict[str, int] | None:
    """``{"placement_version": v, "expert_shards": S}`` of the current placement; None before one."""
    version = current_version(client, keys)
    if version is None:
        return None
    return {"placement_version": version, "expert_shards": placement_json(client, keys, version)["num_shards"]}
