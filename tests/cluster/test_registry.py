"""Discovery and liveness: register, find, update, deregister, and drop out after missed heartbeats."""
import os
import threading

import pytest
import redis

from epserve.services.cluster.redis_server import EmbeddedRedis
from epserve.services.cluster.registry import Registry, ServiceInfo
from tests.waiting import join, wait_until

pytestmark = pytest.mark.integration

GENEROUS_S = 20.0     # bound for waits; the tests poll and never assert on exact timing


@pytest.fixture
def registry(redis_client, cluster_keys):
    """A Registry whose heartbeats are all stopped when the test ends, even when it fails."""
    registry = Registry(redis_client, cluster_keys)
    beats, register = [], registry.register

    def register_and_track(*args, **kwargs):
        beats.append(register(*args, **kwargs))
        return beats[-1]

    registry.register = register_and_track
    yield registry
    for beat in beats:
        beat.stop()


def test_register_live_update_and_deregister(registry, redis_client, cluster_keys):
    b = registry.register("expert", "shard-1", "127.0.0.1:5002", {"slots": 4}, ttl_s=5.0, interval_s=0.5)
    a = registry.register("expert", "shard-0", "127.0.0.1:5001", {"slots": 4}, ttl_s=5.0, interval_s=0.5)
    assert registry.live("expert") == [ServiceInfo("expert", "shard-0", "127.0.0.1:5001", {"slots": 4}, os.getpid()),
                                       ServiceInfo("expert", "shard-1", "127.0.0.1:5002", {"slots": 4}, os.getpid())]
    assert registry.live("attention") == []
    assert 0 < redis_client.pttl(cluster_keys.service("expert", "shard-0")) <= 5000

    a.update({"slots": 4, "placement_version": 2})
    assert registry.live("expert")[0].info == {"slots": 4, "placement_version": 2}

    a.stop()
    assert [s.service_id for s in registry.live("expert")] == ["shard-1"]
    assert redis_client.smembers(cluster_keys.services("expert")) == {b"shard-1"}
    b.stop()
    assert registry.live("expert") == []


def test_heartbeats_refresh_the_ttl_and_restore_the_hash(registry, redis_client, cluster_keys):
    registry.register("router", "r0", "127.0.0.1:6000", {}, ttl_s=30.0, interval_s=0.05)
    key = cluster_keys.service("router", "r0")
    redis_client.pexpire(key, 10_000)
    wait_until(lambda: redis_client.pttl(key) > 20_000, GENEROUS_S, "a heartbeat to restore the 30 s TTL",
               state=lambda: f"pttl {redis_client.pttl(key)} ms")
    redis_client.delete(key)
    wait_until(lambda: [s.service_id for s in registry.live("router")] == ["r0"], GENEROUS_S,
               "a heartbeat to restore the deleted hash", state=lambda: registry.live("router"))


def test_a_service_that_stops_heartbeating_drops_out_and_is_pruned(registry, redis_client, cluster_keys):
    registry.register("attention", "a0", "127.0.0.1:7000", {}, ttl_s=5.0, interval_s=0.1)
    dead = registry.register("attention", "a1", "127.0.0.1:7001", {}, ttl_s=0.3, interval_s=0.1)
    dead.stop(deregister=False)                       # as if it crashed: no more beats, nothing removed
    wait_until(lambda: [s.service_id for s in registry.live("attention")] == ["a0"], GENEROUS_S,
               "a1 to drop out after its TTL", state=lambda: registry.live("attention"))
    assert redis_client.smembers(cluster_keys.services("attention")) == {b"a0"}


def test_wait_for_returns_once_enough_are_live(registry):
    registry.register("expert", "e0", "127.0.0.1:8000", {}, ttl_s=5.0, interval_s=0.5)
    late = threading.Timer(0.2, registry.register, ("expert", "e1", "127.0.0.1:8001", {}, 5.0, 0.5))
    late.start()
    services = registry.wait_for("expert", 2, timeout_s=GENEROUS_S)
    join(late, GENEROUS_S, "the late registration")
    assert [s.service_id for s in services] == ["e0", "e1"]
    with pytest.raises(TimeoutError, match="2 of 3 expert services"):
        registry.wait_for("expert", 3, timeout_s=0.2)


def test_bad_registrations_are_refused(registry):
    with pytest.raises(ValueError, match="service kind"):
        registry.register("gateway", "g0", "127.0.0.1:1", {})
    with pytest.raises(ValueError, match="interval_s < ttl_s"):
        registry.register("router", "r0", "127.0.0.1:1", {}, ttl_s=1.0, interval_s=1.0)
    with pytest.raises(ValueError, match="non-empty"):
        registry.register("router", "", "127.0.0.1:1", {})
    assert registry.live("router") == []


def test_stopping_a_heartbeat_needs_no_redis(cluster_keys):
    """A service shutting down after Redis went away must still stop (its entry expires by TTL)."""
    server = EmbeddedRedis().start()
    try:
        beat = Registry(redis.Redis.from_url(server.url), cluster_keys).register("expert", "0", "127.0.0.1:1", {})
    finally:
        server.stop()
    beat.stop()                                     # logs a warning instead of raising
