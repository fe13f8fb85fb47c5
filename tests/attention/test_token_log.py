"""The attention replica's token-log writer against a real Redis: steps are logged in order, and a Redis that
is away only delays them."""
import socket

import pytest
import redis

from epserve.services.attention.token_log import TokenLogWriter
from epserve.services.cluster.requests import RequestRecord, RequestStore
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


def test_steps_are_logged_in_order_and_survive_an_unreachable_redis(redis_client, cluster_keys):
    store = RequestStore(redis_client, cluster_keys)
    for rid in ("a", "b"):
        store.create(RequestRecord(rid, "running", "attention-0", [1, 2], {}, 7))
    with socket.socket() as s:                                          # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    away = RequestStore(redis.Redis(port=dead_port, socket_connect_timeout=0.2), cluster_keys)
    writer = TokenLogWriter(away, retry_s=0.05)
    try:
        writer.append({"a": [10], "b": [20, 21]})                       # Redis away: kept, retried
        writer.append({"a": [11, 12]})
        writer.append({"b": [22]})
        assert store.tokens("a") == [] and store.tokens("b") == []
        writer.store = store                                            # Redis back
        wait_until(lambda: store.tokens("a") == [10, 11, 12] and store.tokens("b") == [20, 21, 22], 30,
                   "the queued steps written", state=lambda: (store.tokens("a"), store.tokens("b")))
        writer.append({"a": [13]})
        wait_until(lambda: store.tokens("a") == [10, 11, 12, 13], 30, "a later step written")
        assert (store.get("a").emitted, store.get("b").emitted) == (4, 3)
    finally:
        writer.stop()
