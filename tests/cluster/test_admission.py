"""Admission over replicas found in a real Redis registry: least loaded first, bounded queue."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from epserve.services.cluster.registry import Registry
from epserve.services.router.admission import Admission, NoReplicas, QueueFull, WaitCancelled

pytestmark = pytest.mark.integration


@pytest.fixture
def registry(redis_client, cluster_keys):
    registry = Registry(redis_client, cluster_keys)
    beats = []
    yield registry, beats
    for beat in beats:
        beat.stop()


def register(registry, beats, name, **info):
    beats.append(registry.register("attention", name, f"127.0.0.1:{1000 + len(beats)}", {"max_num_seqs": 1, **info}))


def test_no_replica_is_an_error(registry):
    with pytest.raises(NoReplicas):
        Admission(registry[0]).acquire(timeout_s=1)


def test_least_loaded_replica_wins(registry):
    reg, beats = registry
    register(reg, beats, "a", kv_blocks_used=90, kv_blocks_total=100, max_num_seqs=4)
    register(reg, beats, "b", kv_blocks_used=10, kv_blocks_total=100, max_num_seqs=4)
    admission = Admission(reg)
    assert admission.acquire(1).service_id == "b"


def test_full_replicas_queue_up_to_the_bound_then_refuse(registry):
    reg, beats = registry
    register(reg, beats, "a")
    admission = Admission(reg, max_queue=1, refresh_s=0.05)
    first = admission.acquire(1)
    got = []
    waiter = threading.Thread(target=lambda: got.append(admission.acquire(10)))
    waiter.start()
    while admission._waiting == 0:                   # the second request is now queued
        threading.Event().wait(0.01)
    with pytest.raises(QueueFull):
        admission.acquire(1)
    admission.release(first)
    waiter.join(timeout=10)
    assert got and got[0].service_id == "a"


def test_queued_request_times_out_at_its_deadline(registry):
    reg, beats = registry
    register(reg, beats, "a")
    admission = Admission(reg, max_queue=4, refresh_s=0.05)
    admission.acquire(1)
    with pytest.raises(TimeoutError):
        admission.acquire(0.2)


def test_a_cancelled_wait_leaves_the_queue(registry):
    reg, beats = registry
    register(reg, beats, "a")
    admission = Admission(reg, max_queue=1, refresh_s=0.05)
    admission.acquire(1)
    cancelled = threading.Event()
    waiter = ThreadPoolExecutor(1).submit(admission.acquire, None, cancelled)
    while admission._waiting == 0:
        time.sleep(0.01)
    with pytest.raises(QueueFull):
        admission.acquire(0.1)                  # the one queue place is taken
    cancelled.set()
    with pytest.raises(WaitCancelled):
        waiter.result(timeout=5)
    assert admission._waiting == 0
