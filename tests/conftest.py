"""Test-session setup shared by every test.

Without CUDA, Triton kernels run in the interpreter (``TRITON_INTERPRET=1``), which must be set
before ``triton`` is first imported; ``gpu`` tests are skipped.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """Random tiny checkpoints saved by transformers' ``save_pretrained``, by name (see tests/hf_models.py)."""
    from tests.hf_models import TINY_CONFIGS, save_tiny_checkpoint

    root = tmp_path_factory.mktemp("hf")
    return {name: save_tiny_checkpoint(name, root) for name in TINY_CONFIGS}


@pytest.fixture(scope="session", autouse=True)
def private_model_cache(tmp_path_factory):
    """The built-in tiny model is written to a per-session cache, never the user's."""
    os.environ["EPSERVE_CACHE"] = str(tmp_path_factory.mktemp("epserve-cache"))


@pytest.fixture(scope="session")
def redis_server():
    """One private redis-server (free loopback port, no persistence) for the whole session."""
    from epserve.services.cluster.redis_server import EmbeddedRedis

    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def redis_client(redis_server):
    """A client of the session's Redis, emptied (FLUSHALL) before the test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def cluster_keys():
    """Keys under a cluster name of this test's own."""
    import uuid

    from epserve.services.cluster.keys import Keys

    return Keys(cluster=f"test-{uuid.uuid4().hex[:12]}")
