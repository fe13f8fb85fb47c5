"""The placement planner: a pure function from expert loads to every shard's experts, and its command."""
import json
import subprocess
import sys

import pytest
import torch

from epserve.services.cluster.planner import EMPTY, balancedness, plan, replicate, shard_times

pytestmark = pytest.mark.unit


def zipf(layers: int, experts: int, exponent: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 1e6 / (torch.stack([torch.randperm(experts, generator=g) for _ in range(layers)]) + 1).double() ** exponent


CASES = [  # layers, experts, shards, redundant, exponent
    (4, 32, 3, 4, 1.0), (6, 64, 8, 8, 1.2), (3, 16, 5, 0, 0.8), (2, 16, 4, 48, 1.0), (58, 256, 72, 32, 1.0)]


@pytest.mark.parametrize("layers,experts,shards,redundant,exponent", CASES)
def test_every_expert_in_every_layer_and_no_two_copies_on_a_shard(layers, experts, shards, redundant, exponent):
    members = plan(zipf(layers, experts, exponent), shards, redundant)
    assert members.shape == (layers, shards, -(-(experts + redundant) // shards))
    for layer in members.tolist():
        placed = [e for shard in layer for e in shard if e != EMPTY]
        assert sorted(set(placed)) == list(range(experts)) and len(placed) == experts + redundant
        for shard in layer:
            real = [e for e in shard if e != EMPTY]
            assert len(real) == len(set(real)), "two copies of one expert on one shard"


@pytest.mark.parametrize("layers,experts,shards,redundant,exponent", CASES)
def test_never_less_balanced_than_without_redundancy_and_deterministic(layers, experts, shards, redundant, exponent):
    load = zipf(layers, experts, exponent, seed=3)
    members = plan(load, shards, redundant)
    assert balancedness(load, members) >= balancedness(load, plan(load, shards, 0)) - 1e-12
    assert torch.equal(members, plan(load.clone(), shards, redundant))


def test_hot_experts_get_the_copies_and_a_uniform_load_is_perfectly_balanced():
    load = torch.ones(1, 8, dtype=torch.float64)
    load[0, 0], load[0, 7] = 10.0, 5.0
    assert replicate(load, 2, 2)[0].tolist() == [2, 1, 1, 1, 1, 1, 1, 2]
    assert balancedness(torch.ones(3, 32), plan(torch.ones(3, 32), 4, 0)) == pytest.approx(1.0)


def test_slow_shards_get_less_load_and_the_coldest_experts():
    load, capacity = zipf(8, 64, 1.0, seed=5), torch.tensor([0.5, 0.5, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    members = plan(load, 6, 8, capacity)
    time_ = shard_times(load, members, capacity)
    assert (time_.max(dim=1).values / time_.mean(dim=1)).max() < 1.05          # balanced in time
    shard_load = shard_times(load, members)                                      # tokens
    assert (shard_load[:, :2].mean(dim=1) < 0.6 * shard_load[:, 2:].mean(dim=1)).all()
    hottest = load.argmax(dim=1)
    assert not any(int(h) in members[l, :2].tolist() for l, h in enumerate(hottest))
    assert balancedness(load, members, capacity) > balancedness(load, plan(load, 6, 8), capacity)


def test_bad_arguments_name_what_is_wrong():
    with pytest.raises(ValueError, match="redundant"):
        plan(torch.ones(1, 16), 1, 1)
    with pytest.raises(ValueError, match="capacity"):
        plan(torch.ones(1, 16), 2, 0, torch.tensor([1.0, 0.0]))


def test_the_command_writes_the_plan(tmp_path):
    load = zipf(3, 16, 1.0).tolist()
    (tmp_path / "load.json").write_text(json.dumps({"load": load}))
    out = subprocess.run([sys.executable, "-m", "epserve.services.cli", "placement", "plan", "--load",
                          str(tmp_path / "load.json"), "--shards", "4", "--redundant", "4", "--out",
                          str(tmp_path / "plan.json")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "plan.json").read_text())
    expected = plan(torch.tensor(load, dtype=torch.float64), 4, 4)
    assert result["layers"] == [[[e for e in shard if e >= 0] for shard in layer] for layer in expected.tolist()]
    assert result["balancedness"] == pytest.approx(balancedness(torch.tensor(load, dtype=torch.float64), expected), abs=1e-6)
    assert result["balancedness"] >= result["balancedness_without_redundancy"]
    bad = subprocess.run([sys.executable, "-m", "epserve.services.cli", "placement", "plan", "--load",
                          str(tmp_path / "missing.json"), "--shards", "4", "--out", str(tmp_path / "x.json")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--load" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.integration
def test_show_reports_the_running_placement_and_a_better_replan(redis_server, redis_client, cluster_keys):
    from epserve.services.cluster.placement import build_placement
    from epserve.services.cluster.state import LoadStats, PlacementStore

    layers, experts, shards = [1, 2], 16, 4
    placement = PlacementStore(redis_client, cluster_keys).publish(build_placement(experts, shards, 4, layers))
    skewed = torch.ones(2, experts, dtype=torch.float64)
    skewed[:, 3], skewed[1, 9] = 400.0, 250.0                                  # hot experts the plan did not expect
    stats = LoadStats(redis_client, cluster_keys)
    for shard in range(shards):                                               # what each shard's slots served
        counts = torch.zeros(2, placement.slots_per_shard, dtype=torch.int64)
        for row in range(2):
            for local, expert in enumerate(placement.local_experts(layers[row], shard)):
                if expert >= 0:
                    counts[row, local] = int(skewed[row, expert] / placement.replica_counts[row, expert])
        stats.flush(shard, placement, counts)
    out = subprocess.run([sys.executable, "-m", "epserve.services.cli", "placement", "show", "--redis",
                          redis_server.url, "--cluster", cluster_keys.cluster, "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    load = LoadStats(redis_client, cluster_keys).logical_load(layers, experts)
    members = placement.physical_to_logical.view(2, shards, -1)
    assert report["placement_version"] == placement.version and report["redundant"] == 4
    assert [r["layer"] for r in report["layers"]] == layers
    assert report["balancedness"] == pytest.approx(balancedness(load, members), abs=1e-6)
    assert report["after_replan"] == pytest.approx(balancedness(load, plan(load, shards, 4)), abs=1e-6)
    assert report["after_replan"] > report["balancedness"]


def test_zero_loads_and_unequal_capacities_never_corner_the_packing():
    """Copies that weigh nothing sort last and all aim at the lightest shard; the packing then has to
    make room instead of doubling an expert on a shard (found by review, fuzzed here)."""
    cases = [(torch.tensor([[0, 19, 14, 0, 0, 0, 1, 0, 18, 16, 10, 0, 0, 0, 0, 0.]]), 2, 8, None),
             (torch.tensor([[2.0, 1, 1, 1]]), 2, 2, torch.tensor([0.576, 0.967]))]
    g = torch.Generator().manual_seed(0)
    for i in range(300):
        experts, shards = int(torch.randint(2, 20, (1,), generator=g)), int(torch.randint(2, 6, (1,), generator=g))
        redundant = int(torch.randint(0, experts * (shards - 1) + 1, (1,), generator=g))
        load = torch.rand(3, experts, generator=g) * (torch.rand(3, experts, generator=g) < 0.5) * 20
        cases.append((load, shards, redundant, torch.rand(shards, generator=g) + 0.2 if i % 2 else None))
    for load, shards, redundant, capacity in cases:
        members = plan(load, shards, redundant, capacity)
        for layer in members.tolist():
            placed = [e for shard in layer for e in shard if e != EMPTY]
            assert sorted(set(placed)) == list(range(load.shape[1])) and len(placed) == load.shape[1] + redundant
            assert all(len([e for e in s if e != EMPTY]) == len({e for e in s if e != EMPTY}) for s in layer)
