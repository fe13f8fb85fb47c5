"""A shard that dies or hangs mid-layer: its tokens go to the other copies of their experts at once.

Two expert shard processes (``epserve serve expert``, real Redis) with every expert on both, and this
process as the attention side (``RemoteExperts`` over the local transport). A SIGKILLed shard's part of
the micro-batch is sent again to the survivor, and the next layers avoid the dead shard; a SIGSTOPped
shard is hedged after ``hedge_after_s``. Outputs equal the in-process experts either way.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from epserve.services.attention.remote_experts import RemoteExperts
from epserve.services.cluster.state import choose_placement
from epserve.services.model.checkpoint import CheckpointReader
from epserve.services.model.moe import LocalExperts
from tests.cluster.test_transports import SHARDS, Shards, make_transport

pytestmark = pytest.mark.integration
TOKENS = 24


@pytest.fixture
def shards(path, config, redis_server):
    """Every expert of every MoE layer on both shards."""
    running = Shards(path, redis_server.url, redundant=config.n_routed_experts, controller=False)
    yield running                             # no controller: the placement stays v1 whatever the test stops
    running.stop()


@pytest.fixture(scope="module")
def local(path, config):
    return LocalExperts.load(CheckpointReader(path), config, config.moe_layers, dtype=torch.float32, device="cpu")


def remote_experts(shards: Shards, config, hedge_after_s: float | None, sync_free: bool = False) -> RemoteExperts:
    placement = choose_placement(shards.registry.client, shards.registry.keys, num_experts=config.n_routed_experts,
                                 num_shards=SHARDS, redundant=config.n_routed_experts, moe_layers=config.moe_layers)
    assert bool((placement.replica_counts == SHARDS).all())
    return RemoteExperts(placement, make_transport(shards, "local"), hedge_after_s=hedge_after_s, sync_free=sync_free)


def one_layer(remote: RemoteExperts, local: LocalExperts, config, layer: int, seed: int) -> float:
    """Max abs difference between the shards' and the in-process experts' output of ``layer``, relative."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, config.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(config.n_routed_experts, generator=g)[:config.num_experts_per_tok]
                       for _ in range(TOKENS)])                                     # [T, K] distinct experts
    weights = torch.rand(TOKENS, config.num_experts_per_tok, generator=g)
    got = remote.combine(remote.dispatch(layer, x, weights, ids))
    want = local.combine(local.dispatch(layer, x, weights, ids))
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("sync_free", [False, True], ids=["sparse", "sync-free"])
def test_a_killed_shard_s_tokens_go_to_the_other_copies(shards, local, config, sync_free):
    remote = remote_experts(shards, config, hedge_after_s=None, sync_free=sync_free)
    try:
        assert one_layer(remote, local, config, config.moe_layers[0], seed=0) <= 1e-5
        assert remote.stats.rerouted == 0
        shards.kill(1)
        first = config.moe_layers[0]
        assert one_layer(remote, local, config, first, seed=1) <= 1e-5        # sent, failed, sent again
        rerouted = remote.stats.rerouted
        assert rerouted > 0
        for i, layer in enumerate(config.moe_layers):                           # shard 1 avoided from now on
            assert one_layer(remote, local, config, layer, seed=2 + i) <= 1e-5
        assert remote.stats.rerouted == rerouted
        assert remote.transport.stats.messages.get(1, 0) <= 2 * len(config.moe_layers)
    finally:
        remote.transport.close()


def test_a_hung_shard_is_hedged(shards, local, config):
    remote = remote_experts(shards, config, hedge_after_s=0.3)
    try:
        assert one_layer(remote, local, config, config.moe_layers[0], seed=0) <= 1e-5
        os.kill(shards.processes[1].pid, signal.SIGSTOP)
        for i, layer in enumerate(config.moe_layers):
            assert one_layer(remote, local, config, layer, seed=10 + i) <= 1e-5
        assert remote.stats.rerouted > 0
    finally:
        os.kill(shards.processes[1].pid, signal.SIGCONT)
        remote.transport.close()


@pytest.mark.parametrize("sync_free", [False, True], ids=["sparse", "sync-free"])
def test_a_hung_shard_stays_avoided_while_it_owes_answers(shards, local, config, sync_free):
    """Each batch a hung shard holds keeps one of its transport slots: once its part was answered elsewhere,
    it gets nothing more until it answers, even after AVOID_S (also when every row goes to every shard)."""
    from epserve.services.attention.remote_experts import AVOID_S

    remote = remote_experts(shards, config, hedge_after_s=0.3, sync_free=sync_free)
    try:
        os.kill(shards.processes[1].pid, signal.SIGSTOP)
        assert one_layer(remote, local, config, config.moe_layers[0], seed=0) <= 1e-5       # hedged
        sent = remote.transport.stats.messages.get(1, 0)
        time.sleep(AVOID_S + 0.5)
        for i, layer in enumerate(config.moe_layers * 3):
            assert one_layer(remote, local, config, layer, seed=1 + i) <= 1e-5
        assert remote.transport.stats.messages.get(1, 0) == sent
    finally:
        os.kill(shards.processes[1].pid, signal.SIGCONT)
        remote.transport.close()


def test_with_no_other_copy_a_dead_shard_s_part_fails_the_step(path, config, redis_server, local):
    """No redundancy: nothing to send a dead shard's tokens to; the error reaches the engine (which runs
    the step again once the controller has re-placed its experts)."""
    from epserve.services.cluster.transport import ExpertShardError

    running = Shards(path, redis_server.url, redundant=0, controller=False)
    placement = choose_placement(running.registry.client, running.registry.keys, num_experts=config.n_routed_experts,
                                 num_shards=SHARDS, redundant=0, moe_layers=config.moe_layers)
    remote = RemoteExperts(placement, make_transport(running, "local"))
    try:
        running.kill(1)
        with pytest.raises(ExpertShardError, match="expert shard 1"):
            one_layer(remote, local, config, config.moe_layers[0], seed=0)
        assert remote.stats.rerouted == 0
    finally:
        remote.transport.close()
        running.stop()
