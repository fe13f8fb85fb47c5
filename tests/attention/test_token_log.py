"""The attention replica's token-log writer against a real Redis: steps are logged in order (with the logprobs
of requests that asked), and a Redis that is away only delays them."""
import os
import queue
import signal
import socket
import time

import pytest
import redis
import torch

from epserve.services.attention.engine_loop import EngineLoop
from epserve.services.attention.token_log import TokenLogWriter
from epserve.services.cluster.redis_server import EmbeddedRedis
from epserve.services.cluster.requests import RequestRecord, RequestStore, TokenRun
from epserve.services.engine.config import EngineConfig
from epserve.services.engine.engine import LLMEngine
from epserve.services.engine.params import SamplingParams, TokenLogprobs
from epserve.services.model.tiny import tiny_model_path
from epserve.services.params import logprobs_from_log, logprobs_to_proto
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
        writer.append({"a": [10], "b": [20, 21]}, {"a": 0, "b": 0})     # Redis away: kept, retried
        writer.append({"a": [11, 12]}, {"a": 1})
        writer.append({"b": [22]}, {"b": 2})
        assert store.tokens("a") == [] and store.tokens("b") == []
        writer.store = store                                            # Redis back
        wait_until(lambda: store.tokens("a") == [10, 11, 12] and store.tokens("b") == [20, 21, 22], 30,
                   "the queued steps written", state=lambda: (store.tokens("a"), store.tokens("b")))
        writer.append({"a": [13]}, {"a": 3})
        wait_until(lambda: store.tokens("a") == [10, 11, 12, 13], 30, "a later step written")
        assert (store.get("a").emitted, store.get("b").emitted) == (4, 3)
    finally:
        writer.stop()


def test_logprobs_are_logged_with_their_tokens_through_an_unreachable_redis(redis_client, cluster_keys):
    store = RequestStore(redis_client, cluster_keys)
    for rid in ("asked", "plain"):
        store.create(RequestRecord(rid, "running", "attention-0", [1, 2], {}, 7))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    writer = TokenLogWriter(RequestStore(redis.Redis(port=dead_port, socket_connect_timeout=0.2), cluster_keys),
                            retry_s=0.05)
    first, second = TokenLogprobs(-0.5, ((10, -0.5), (3, -1.25))), TokenLogprobs(-2.0, ((4, -0.25), (11, -2.0)))
    try:
        writer.append({"asked": [10], "plain": [20]}, {"asked": 0, "plain": 0}, {"asked": [first]})   # Redis away
        writer.append({"asked": [11], "plain": [21]}, {"asked": 1, "plain": 1}, {"asked": [second]})
        writer.store = store
        wait_until(lambda: store.tokens("asked") == [10, 11] and store.tokens("plain") == [20, 21], 30,
                   "the queued steps written")
        assert store.token_log("asked") == ([10, 11], [[-0.5, [[10, -0.5], [3, -1.25]]],
                                                       [-2.0, [[4, -0.25], [11, -2.0]]]])
        assert store.token_log("plain") == ([20, 21], None)
        assert logprobs_from_log(store.token_log("asked")[1][1]) == logprobs_to_proto(second)
    finally:
        writer.stop()


def test_a_write_that_timed_out_but_landed_is_not_logged_twice(cluster_keys):
    """Redis stopped (SIGSTOP) mid-write: the client times out after its commands were sent, Redis runs them
    when it resumes, and the writer's retry (merged with the steps queued meanwhile) logs only what is new."""
    with EmbeddedRedis() as server:
        store = RequestStore(redis.Redis.from_url(server.url), cluster_keys)
        store.create(RequestRecord("a", "running", "attention-0", [1, 2], {}, 7))
        writer = TokenLogWriter(RequestStore(redis.Redis.from_url(server.url, socket_timeout=0.2), cluster_keys),
                                retry_s=0.05)
        try:
            writer.append({"a": [10]}, {"a": 0})
            wait_until(lambda: store.tokens("a") == [10], 30, "the first step written")
            os.kill(server.pid, signal.SIGSTOP)
            try:
                writer.append({"a": [11, 12]}, {"a": 1})              # sent, unanswered: the client times out
                time.sleep(0.5)
                writer.append({"a": [13]}, {"a": 3})
                time.sleep(0.3)
            finally:
                os.kill(server.pid, signal.SIGCONT)
            wait_until(lambda: store.tokens("a") == [10, 11, 12, 13], 30, "every step written",
                       state=lambda: store.tokens("a"))
            time.sleep(0.3)                                            # any late retry would land by now
            assert store.tokens("a") == [10, 11, 12, 13] and store.get("a").emitted == 4
        finally:
            writer.stop()


def test_a_resumed_request_fills_its_log_behind_it_and_logs_each_token_once(redis_client, cluster_keys):
    """A request resumed on a new replica with the 5 tokens its client has, while the log holds only 3 (the old
    replica's writer was behind): the new replica logs the 2 missing ones first, then its steps; a late write of
    the old writer lands on positions the log holds already and adds nothing."""
    prompt, params = [12, 13, 14, 15, 16, 17], SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)
    engine = LLMEngine.from_path(tiny_model_path(), EngineConfig(micro_batches=1), dtype=torch.float32)
    (undisturbed,) = [s.output_ids for s in engine.generate([prompt], params)]
    store = RequestStore(redis_client, cluster_keys)
    store.create(RequestRecord("r", "running", "attention-0", prompt, {}, 7))
    assert store.append_tokens([TokenRun("r", 0, undisturbed[:3])]) == []                 # the old writer, behind
    writer = TokenLogWriter(store, retry_s=0.05)
    loop = EngineLoop(engine, on_step=writer.append, step_retries=0).start()
    outputs: queue.Queue = queue.Queue()
    try:
        loop.submit("r", prompt, params, outputs, emitted_ids=undisturbed[:5])
        while not outputs.get(timeout=60).finished:
            pass
        wait_until(lambda: len(store.tokens("r")) >= len(undisturbed), 30, "the log complete",
                   state=lambda: store.tokens("r"))
        assert store.append_tokens([TokenRun("r", 3, undisturbed[3:6])]) == []           # the old writer, late
        assert store.tokens("r") == undisturbed and store.get("r").emitted == len(undisturbed)
    finally:
        loop.stop()
        writer.stop()
