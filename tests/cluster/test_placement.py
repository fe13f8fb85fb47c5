"""Placement of logical experts on shard slots, with redundant copies of hot experts."""
import pytest
import torch

from epserve.services.cluster.placement import EMPTY, Placement, build_placement

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("experts,shards,redundant", [(32, 2, 2), (32, 3, 0), (32, 3, 4), (256, 8, 32), (16, 4, 48)])
def test_every_expert_placed_copies_on_distinct_shards(experts, shards, redundant):
    load = torch.rand(3, experts, generator=torch.Generator().manual_seed(experts)) ** 3 * 100
    p = build_placement(experts, shards, redundant, [1, 2, 3], load)
    assert p.slots_per_shard == -(-(experts + redundant) // shards)
    for row in range(3):
        used = p.physical_to_logical[row]
        assert int((used != EMPTY).sum()) == experts + redundant
        assert set(used[used != EMPTY].tolist()) == set(range(experts))
        for shard in range(shards):
            local = [e for e in p.local_experts(p.moe_layers[row], shard) if e != EMPTY]
            assert len(local) == len(set(local)), "two copies of one expert on one shard"


def test_hot_experts_get_the_copies_and_shards_balance():
    load = torch.ones(1, 8)
    load[0, 0], load[0, 7] = 10.0, 5.0
    p = build_placement(8, 2, 2, [0], load)
    assert p.replica_counts[0].tolist() == [2, 1, 1, 1, 1, 1, 1, 2]
    shard_load = p.expected_shard_load(load.double())[0]
    assert abs(shard_load[0] - shard_load[1]) <= 1.0
    uniform = build_placement(32, 4, 0, [0])
    assert (uniform.expected_shard_load(torch.ones(1, 32, dtype=torch.float64)) == 8).all()


def test_logical_to_physical_spreads_over_replicas():
    load = torch.ones(1, 8)
    load[0, 3] = 50.0
    p = build_placement(8, 2, 1, [5], load)
    ids = torch.full((64, 2), 3)
    phys = p.to_physical(5, ids)
    assert (p.physical_to_logical[0][phys] == 3).all()
    copies = set(p.logical_to_physical[0, 3].tolist())
    assert set(phys.flatten().tolist()) == copies and len(copies) == 2
    assert {p.shard_of_slot(s) for s in copies} == {0, 1}


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_the_host_lookup_gives_the_device_lookup_s_slots(dtype):
    """to_physical runs numpy on the CPU and torch on a GPU: both give the same slot for every choice."""
    generator = torch.Generator().manual_seed(1)
    load = torch.rand(2, 32, generator=generator) ** 3 * 100
    p = build_placement(32, 3, 7, [1, 2], load)
    ids = torch.randint(0, 32, (37, 6), generator=generator, dtype=dtype)
    for row in range(2):
        host = p._to_physical_host(row, ids)
        assert host.dtype == torch.int64 and host.equal(p._to_physical_torch(row, ids))
        assert (p.physical_to_logical[row][host] == ids).all()


def test_json_round_trip_and_validation():
    p = build_placement(16, 2, 2, [1, 2], version=7)
    q = Placement.from_json(p.to_json())
    assert q.version == 7 and q.physical_to_logical.equal(p.physical_to_logical)
    assert q.logical_to_physical.equal(p.logical_to_physical)
    with pytest.raises(ValueError, match="redundant"):
        build_placement(16, 1, 1, [1])
    with pytest.raises(ValueError, match="load"):
        build_placement(16, 2, 0, [1], torch.ones(2, 16))
