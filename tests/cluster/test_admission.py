"""Admission over replicas found in a real Redis registry: least loaded first, bounded queue."""
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from epserve.services.cluster.registry import Registry
from epserve.services.router.admission import Admission, NoReplicas, QueueFull, WaitCancelled
from tests.waiting import join, wait_until

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
    wait_until(lambda: admission._waiting, 10, "the second request to queue")
    with pytest.raises(QueueFull):
        admission.acquire(1)
    admission.release(first)
    join(waiter, 10, "the queued request to be admitted")
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
    with ThreadPoolExecutor(1) as pool:         # waits for no timeout: cancelled even when the test fails
        waiter = pool.submit(admission.acquire, None, cancelled)
        try:
            wait_until(lambda: admission._waiting, 10, "the request to queue")
            with pytest.raises(QueueFull):
                admission.acquire(0.1)          # the one queue place is taken
        finally:
            cancelled.set()
        with pytest.raises(WaitCancelled):
            waiter.result(timeout=5)
    assert admission._waiting == 0
