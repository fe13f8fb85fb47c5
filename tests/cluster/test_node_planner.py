"""Node-aware placement (each expert group on one node) and the cross-node traffic of a placement."""
import json
import subprocess
import sys

import pytest
import torch

from epserve.services.cluster.node_planner import cross_node_traffic, node_of_shard, plan_node_aware
from epserve.services.cluster.planner import EMPTY, balancedness, plan

pytestmark = pytest.mark.unit


def zipf(layers: int, experts: int, exponent: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 1e6 / (torch.stack([torch.randperm(experts, generator=g) for _ in range(layers)]) + 1).double() ** exponent


def group_limited_routes(layers: int, experts: int, groups: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """[L, T, 8]: each token takes 2 experts in each of 4 groups, groups and experts drawn with a skew."""
    g, size = torch.Generator().manual_seed(seed), experts // groups
    group_weight = 1.0 / (torch.randperm(groups, generator=g) + 1).double()
    expert_weight = 1.0 / (torch.randperm(size, generator=g) + 1).double()
    chosen = torch.multinomial(group_weight.expand(layers * tokens, -1), 4, generator=g)            # [L*T, 4]
    within = torch.multinomial(expert_weight.expand(layers * tokens * 4, -1), 2, generator=g)       # [L*T*4, 2]
    return (chosen.view(-1, 1) * size + within).view(layers, tokens, 8)


CASES = [  # layers, experts, shards, redundant, nodes, groups
    (4, 32, 8, 4, 2, 4), (3, 64, 16, 16, 4, 8), (2, 16, 4, 0, 2, 2), (5, 256, 64, 64, 8, 8), (2, 24, 6, 6, 3, 6)]


@pytest.mark.parametrize("layers,experts,shards,redundant,nodes,groups", CASES)
def test_each_group_on_one_node_every_expert_placed_no_two_copies_on_a_shard(layers, experts, shards, redundant,
                                                                            nodes, groups):
    load = zipf(layers, experts, 1.0)
    members = plan_node_aware(load, shards, redundant, nodes, groups)
    assert members.shape == plan(load, shards, redundant).shape
    node = node_of_shard(shards, nodes).tolist()
    for layer in members.tolist():
        placed = [e for shard in layer for e in shard if e != EMPTY]
        assert sorted(set(placed)) == list(range(experts)) and len(placed) == experts + redundant
        group_nodes = {}
        for s, shard in enumerate(layer):
            real = [e for e in shard if e != EMPTY]
            assert len(real) == len(set(real)), "two copies of one expert on one shard"
            for e in real:
                group_nodes.setdefault(e // (experts // groups), set()).add(node[s])
        assert all(len(on) == 1 for on in group_nodes.values()), "a group's copies on two nodes"
        per_node = [sum(1 for on in group_nodes.values() if on == {n}) for n in range(nodes)]
        assert per_node == [groups // nodes] * nodes
    assert torch.equal(members, plan_node_aware(load.clone(), shards, redundant, nodes, groups))


def test_within_a_node_the_copies_balance_and_redundancy_helps():
    load = zipf(6, 64, 1.2, seed=2)
    members = plan_node_aware(load, 16, 16, 4, 8)
    assert balancedness(load, members) > balancedness(load, plan_node_aware(load, 16, 0, 4, 8))
    assert balancedness(load, members) <= balancedness(load, plan(load, 16, 16)) + 1e-9   # the price of the groups


def test_a_slow_node_gets_the_lighter_groups():
    load = zipf(8, 64, 1.0, seed=4)
    capacity = torch.tensor([0.5] * 4 + [1.0] * 12, dtype=torch.float64)                # node 0 at half speed
    members = plan_node_aware(load, 16, 8, 4, 8, capacity)
    node_load = torch.stack([load[l, members[l, :4][members[l, :4] >= 0].unique()].sum() for l in range(8)])
    assert (node_load < 0.8 * load.sum(dim=1) / 4).all()
    assert balancedness(load, members, capacity) > balancedness(load, plan_node_aware(load, 16, 8, 4, 8), capacity)


def test_bad_arguments_name_what_is_wrong():
    with pytest.raises(ValueError, match="nodes"):
        node_of_shard(64, 5)
    with pytest.raises(ValueError, match="groups"):
        plan_node_aware(torch.ones(1, 32), 8, 0, 2, 3)                               # 32 experts, 3 groups
    with pytest.raises(ValueError, match="groups"):
        plan_node_aware(torch.ones(1, 32), 8, 0, 4, 2)                               # 2 groups on 4 nodes
    with pytest.raises(ValueError, match="redundant"):
        plan_node_aware(torch.ones(1, 32), 8, 3, 2, 4)                               # 3 copies over 2 nodes


def test_cross_node_traffic_of_a_hand_built_placement():
    # 3 nodes of one shard each; expert 4 has copies on nodes 1 and 2.
    members = torch.tensor([[[0, 1, EMPTY], [2, 3, 4], [4, 5, EMPTY]]])
    routes = [torch.tensor([[0, 1],      # token 0, node 0: all local            -> no remote node
                            [0, 4],      # token 1, node 1: 4 local, 0 on node 0 -> 1 remote node
                            [5, 4],      # token 2, node 2: both local            -> none
                            [2, 4],      # token 3, node 0: 2 and 4 on node 1     -> 1 (one send for both)
                            [5, 4]])]    # token 4, node 1: 4 local, 5 on node 2  -> 1
    assert cross_node_traffic(routes, members, 3) == pytest.approx((3 / 10, 3 / 5))
    # token 0 on node 0 needs 3 (node 1) and 4: its lowest-numbered copy is node 1 too -> 1 remote node
    assert cross_node_traffic([torch.tensor([[3, 4]])], members, 3) == pytest.approx((1 / 2, 1.0))
    # ... and 5 (node 2 only) with 4: 4 goes to node 1, the lowest, not to node 2 with 5 -> 2 remote nodes
    assert cross_node_traffic([torch.tensor([[5, 4]])], members, 3) == pytest.approx((2 / 2, 2.0))
    with pytest.raises(ValueError, match="routes"):
        cross_node_traffic([torch.tensor([[6, 0]])], members, 3)


def test_node_aware_sends_fewer_tokens_across_nodes_on_group_limited_routes():
    routes = group_limited_routes(4, 256, 8, 2048)
    load = torch.zeros(4, 256, dtype=torch.float64).scatter_add_(
        1, routes.flatten(1), torch.ones(4, routes[0].numel(), dtype=torch.float64))
    global_ = cross_node_traffic(routes, plan(load, 64, 64), 8)
    aware = cross_node_traffic(routes, plan_node_aware(load, 64, 64, 8, 8), 8)
    assert aware[0] < 0.9 * global_[0] and aware[1] < 0.9 * global_[1]
    assert aware[1] <= 4                                                    # at most one node per group


def run_plan(tmp_path, *flags):
    return subprocess.run([sys.executable, "-m", "epserve.services.cli", "placement", "plan", "--load",
                           str(tmp_path / "load.json"), "--out", str(tmp_path / "plan.json"), *flags],
                          capture_output=True, text=True, timeout=120)


def test_the_command_plans_per_node_and_reports_the_traffic(tmp_path):
    routes = group_limited_routes(2, 64, 8, 64, seed=1)
    load = torch.zeros(2, 64, dtype=torch.float64).scatter_add_(
        1, routes.flatten(1), torch.ones(2, routes[0].numel(), dtype=torch.float64))
    (tmp_path / "load.json").write_text(json.dumps({"load": load.tolist(), "routes": routes.tolist()}))
    for aware in (False, True):
        out = run_plan(tmp_path, "--shards", "8", "--redundant", "4", "--nodes", "4",
                       *(["--node-aware", "--groups", "8"] if aware else []))
        assert out.returncode == 0, out.stderr
        result = json.loads((tmp_path / "plan.json").read_text())
        expected = plan_node_aware(load, 8, 4, 4, 8) if aware else plan(load, 8, 4)
        assert result["layers"] == [[[e for e in shard if e >= 0] for shard in layer] for layer in expected.tolist()]
        fraction, remote = cross_node_traffic(routes, expected, 4)
        assert result["cross_node_fraction"] == pytest.approx(fraction, abs=1e-6)
        assert result["remote_nodes_per_token"] == pytest.approx(remote, abs=1e-6)
        assert result["node_aware"] is aware and f"{fraction:.4f}" in out.stdout
    (tmp_path / "load.json").write_text(json.dumps({"load": load.tolist()}))
    out = run_plan(tmp_path, "--shards", "8", "--nodes", "4")
    assert out.returncode == 0, out.stderr
    assert "cross_node_fraction" not in json.loads((tmp_path / "plan.json").read_text())
    assert "needs \"routes\"" in out.stdout
    for flags, named in ((["--nodes", "3"], "--nodes"), (["--node-aware", "--groups", "8"], "--node-aware"),
                         (["--nodes", "4", "--node-aware", "--groups", "3"], "groups")):
        bad = run_plan(tmp_path, "--shards", "8", *flags)
        assert bad.returncode == 2 and named in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
