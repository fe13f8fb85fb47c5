"""Live placement switches: the two-phase store, fail-over placements, the controller's decisions, a shard
holding two versions, and a whole switch in process (real Redis, real shards behind gRPC, the follower)."""
import threading

import pytest
import torch

from epserve.services.attention.remote_experts import RemoteExperts
from epserve.services.cluster.controller import PlacementController, decide, request_rebalance
from epserve.services.cluster.expert_batch import BadBatch, ExpertBatch
from epserve.services.cluster.placement import EMPTY, build_placement
from epserve.services.cluster.planner import balancedness
from epserve.services.cluster.registry import Registry
from epserve.services.cluster.state import LoadStats, PlacementStore, choose_placement
from epserve.services.cluster.transport import ExpertTransport, ShardEndpoint
from epserve.services.expert.follower import PlacementFollower
from epserve.services.expert.shard import ExpertShard
from epserve.services.model.checkpoint import CheckpointReader
from epserve.services.model.moe import LocalExperts
from tests.cluster.test_expert_path import shard_cluster
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

E, S, LAYERS = 8, 3, (1, 2)


def skewed_load(rows=len(LAYERS), experts=E, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(rows, experts, generator=generator, dtype=torch.float64) * 10) ** 3


# ---- the two-phase store ------------------------------------------------------------------------
def test_a_proposal_is_served_only_once_committed(redis_client, cluster_keys):
    store = PlacementStore(redis_client, cluster_keys)
    first = store.publish(build_placement(E, S, 0, LAYERS))
    proposed = store.propose(build_placement(E, S, 2, LAYERS))
    assert store.current().version == first.version and store.pending_version() == proposed.version
    store.mark_ready(proposed.version, 0)
    store.mark_ready(proposed.version, 2)
    assert store.ready(proposed.version) == {0, 2}
    store.commit(proposed.version)
    assert store.current().version == proposed.version and store.pending_version() is None
    abandoned = store.propose(build_placement(E, S, 1, LAYERS))
    store.abandon(abandoned.version - 1)                     # not the pending one: nothing happens
    assert store.pending_version() == abandoned.version
    store.abandon(abandoned.version)
    assert store.pending_version() is None and store.current().version == proposed.version
    store.commit(first.version)                              # current only moves forward
    assert store.current().version == proposed.version


def test_fail_over_placement_leaves_the_dead_shard_out_and_restarting_services_keep_it(redis_client, cluster_keys):
    load = skewed_load()
    placement = build_placement(E, S, 2, LAYERS, load, shards=[0, 2])
    members = placement.members()                                                # [rows, S, slots]
    assert placement.shards_in_use() == [0, 2] and (members[:, 1] == EMPTY).all()
    for row in members:
        assert set(row.flatten().tolist()) - {EMPTY} == set(range(E))          # every expert placed
        for shard in row:
            held = [e for e in shard.tolist() if e != EMPTY]
            assert len(held) == len(set(held))                                  # one copy per shard at most
    with pytest.raises(ValueError, match="subset"):
        build_placement(E, S, 2, LAYERS, shards=[3])
    store = PlacementStore(redis_client, cluster_keys)
    store.publish(placement)
    again = choose_placement(redis_client, cluster_keys, num_experts=E, num_shards=S, redundant=2, moe_layers=LAYERS)
    assert again.version == 1                                # a restarted shard serves it; the controller re-plans


# ---- decisions ------------------------------------------------------------------------------------
def test_decisions(redis_client):
    current = build_placement(E, S, 2, LAYERS)
    load, live = skewed_load(), {0: 1.0, 1: 1.0, 2: 1.0}
    assert decide(current, live, set(live), load, redundant=2, threshold=0.0, rebalance=False).placement is None
    rebalance = decide(current, live, set(live), load, redundant=2, threshold=0.0, rebalance=True)
    assert rebalance.after > rebalance.before and rebalance.placement.shards_in_use() == [0, 1, 2]
    assert rebalance.after == pytest.approx(balancedness(load, rebalance.placement.members()))
    high = decide(current, live, set(live), load, redundant=2, threshold=1.0, rebalance=True)
    assert high.placement is None and "below the threshold" in high.reason
    assert decide(current, live, set(live), load, redundant=2, threshold=1.0, rebalance=True, force=True).placement
    assert "no expert load" in decide(current, live, set(live), None, redundant=2, threshold=0, rebalance=True).reason
    survivors = {0: 1.0, 2: 1.0}
    assert decide(current, survivors, {0, 2}, load, redundant=2, threshold=0, rebalance=False).placement is None
    fail_over = decide(current, survivors, set(live), load, redundant=2, threshold=0, rebalance=False)
    assert fail_over.placement.shards_in_use() == [0, 2] and "fail-over" in fail_over.reason
    recovery = decide(fail_over.placement, live, set(live), None, redundant=2, threshold=0, rebalance=False)
    assert recovery.placement.shards_in_use() == [0, 1, 2] and "recovery" in recovery.reason
    slow = decide(current, {0: 1.0, 1: 1.0, 2: 0.25}, set(live), load, redundant=2, threshold=0, rebalance=True)
    shard_load = slow.placement.expected_shard_load(load)                              # [rows, S]
    assert (shard_load[:, 2] < shard_load[:, :2].min(dim=1).values).all()             # the slow shard gets less


# ---- a shard holding two versions -------------------------------------------------------------------
def _batch(placement, layer, shard, ids, x, weights):
    """What RemoteExperts sends ``shard`` for tokens choosing logical ``ids [T, K]``."""
    slots = placement.to_physical(layer, ids)
    here = torch.div(slots, placement.slots_per_shard, rounding_mode="floor") == shard
    local = torch.where(here, slots % placement.slots_per_shard, -1).to(torch.int32)
    return ExpertBatch(layer, placement.version, x, None, local, torch.where(here, weights, 0.0))


def test_a_shard_holds_a_second_version_reading_only_experts_it_lacks(path, config):
    experts, layer = config.n_routed_experts, config.moe_layers[0]
    first = build_placement(experts, 2, 0, config.moe_layers, version=1)
    second = build_placement(experts, 2, 4, config.moe_layers, skewed_load(len(config.moe_layers), experts), version=2)
    shard = ExpertShard(path, 0, first, dtype=torch.float32)
    before = set(shard.reader.names_read)
    shard.hold(second)
    read = {(int(n.split(".")[2]), int(n.split(".")[5])) for n in set(shard.reader.names_read) - before}
    for lay in config.moe_layers:
        new = set(second.local_experts(lay, 0)) - set(first.local_experts(lay, 0)) - {EMPTY}
        assert {e for l_, e in read if l_ == lay} == new
    assert shard.versions() == [1, 2]
    local = LocalExperts.load(CheckpointReader(path), config, [layer], dtype=torch.float32, device="cpu")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, config.hidden_size, generator=generator)
    ids = torch.stack([torch.randperm(experts, generator=generator)[:config.num_experts_per_tok] for _ in range(8)])
    weights = torch.rand(8, config.num_experts_per_tok, generator=generator)
    outputs = {}
    for placement in (first, second):
        other = ExpertShard(path, 1, placement, dtype=torch.float32)
        outputs[placement.version] = sum(s.serve(_batch(placement, layer, s.shard_id, ids, x, weights))
                                         for s in (shard, other))
    expected = local.combine(local.dispatch(layer, x, weights, ids))
    for out in outputs.values():
        assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()
    shard.release(1)
    assert shard.versions() == [2]
    with pytest.raises(BadBatch, match="placement v1, this shard serves v2") as err:
        shard.serve(_batch(first, layer, 0, ids, x, weights))
    assert err.value.precondition


# ---- a whole switch, in process ----------------------------------------------------------------------
def test_a_live_switch_commits_while_dispatches_run_and_frees_the_old_version(path, config, redis_client,
                                                                             cluster_keys):
    """Two shards with followers and controllers; a client dispatching without pause through RemoteExperts
    (a step boundary between dispatches). A forced rebalance commits v2; the client moves to it at a boundary;
    each shard releases v1 once the one registered replica reports v2. Every dispatch's output is exact."""
    experts, layer = config.n_routed_experts, config.moe_layers[0]
    store, registry = PlacementStore(redis_client, cluster_keys), Registry(redis_client, cluster_keys)
    first = store.publish(build_placement(experts, 2, 2, config.moe_layers))
    counts = skewed_load(len(config.moe_layers), first.slots_per_shard).long()     # tokens per local slot
    for shard in range(2):
        LoadStats(redis_client, cluster_keys).flush(shard, first, counts)
    local = LocalExperts.load(CheckpointReader(path), config, [layer], dtype=torch.float32, device="cpu")
    with shard_cluster(path, first) as cluster:
        beats = [registry.register("expert", str(s.shard_id), cluster.addresses[s.shard_id],
                                   {"placement_versions": s.versions()}) for s in cluster.shards]
        followers = [PlacementFollower(s, store, registry, lambda v, b=b: b.update({"placement_versions": v}),
                                       poll_s=0.05).start() for s, b in zip(cluster.shards, beats)]
        controllers = [PlacementController(redis_client, cluster_keys, redundant=4, interval_s=0, threshold=0,
                                           window_s=60, ready_timeout_s=30).start() for _ in range(2)]
        endpoints = {s: ShardEndpoint(a) for s, a in cluster.addresses.items()}
        transport = ExpertTransport(endpoints, mode="grpc")
        remote = RemoteExperts(first, transport)
        replica = registry.register("attention", "a0", "127.0.0.1:1", {"placement_version": 1})
        generator = torch.Generator().manual_seed(0)
        errors, versions, done = [], set(), threading.Event()

        def client():
            while not done.is_set():
                remote.at_step_boundary()
                x = torch.randn(16, config.hidden_size, generator=generator)
                ids = torch.stack([torch.randperm(experts, generator=generator)[:config.num_experts_per_tok]
                                   for _ in range(16)])
                weights = torch.rand(16, config.num_experts_per_tok, generator=generator)
                out = remote.combine(remote.dispatch(layer, x, weights, ids))
                expected = local.combine(local.dispatch(layer, x, weights, ids))
                if (out - expected).abs().max() > 1e-5 * expected.abs().max():
                    errors.append(remote.placement.version)
                versions.add(remote.placement.version)

        worker = threading.Thread(target=client)
        worker.start()
        try:
            answer = request_rebalance(redis_client, cluster_keys, force=True, timeout_s=60)
            assert answer["committed"] == 2 and "rebalance" in answer["reason"]
            assert sum(c.leads() for c in controllers) == 1                 # one leader
            remote.stage(store.get(2))
            wait_until(lambda: versions >= {1, 2}, 30, "the client to move to v2", state=lambda: versions)
            assert all(s.versions() == [1, 2] for s in cluster.shards)       # the replica still reports v1
            replica.update({"placement_version": 2})
            wait_until(lambda: all(s.versions() == [2] for s in cluster.shards), 30, "v1 released",
                       state=lambda: [s.versions() for s in cluster.shards])
            assert registry.live("expert")[0].info["placement_versions"] == [2]
        finally:
            done.set()
            worker.join(timeout=30)
            for part in (*controllers, *followers):
                part.stop()
            for beat in (*beats, replica):
                beat.stop()
            transport.close()
    assert not errors and not worker.is_alive()


def test_rebalance_without_a_controller_times_out_clearly(redis_client, cluster_keys):
    with pytest.raises(TimeoutError, match="no placement controller answered"):
        request_rebalance(redis_client, cluster_keys, force=False, timeout_s=0.3)


def test_a_new_leader_fails_over_the_shard_that_died_with_the_old_leader(redis_client, cluster_keys):
    """The leader and shard 1 go together (one process): the controller that takes the lease over proposes a
    placement without shard 1, because it watched the registry while it was not leading."""
    store, registry = PlacementStore(redis_client, cluster_keys), Registry(redis_client, cluster_keys)
    store.publish(build_placement(E, S, 2, LAYERS))
    beats = {s: registry.register("expert", str(s), f"127.0.0.1:{s + 1}", {"placement_versions": [1]})
             for s in range(S)}
    controllers = [PlacementController(redis_client, cluster_keys, redundant=2, interval_s=0, threshold=0,
                                       window_s=60, ready_timeout_s=60).start() for _ in range(2)]
    try:
        wait_until(lambda: redis_client.get(cluster_keys.balancer_lease) is not None, 10, "a leader")
        leader = next(c for c in controllers if c.holder == redis_client.get(cluster_keys.balancer_lease).decode())
        follower = next(c for c in controllers if c is not leader)
        wait_until(lambda: follower._seen == {0, 1, 2}, 10, "the follower to see every shard")
        leader.stop()
        beats.pop(1).stop()
        wait_until(lambda: store.pending_version() is not None, 30, "a fail-over proposal")
        assert store.get(store.pending_version()).shards_in_use() == [0, 2]
    finally:
        for part in (*controllers, *beats.values()):
            part.stop()
