"""Node-aware placement, and how many of a placement's dispatches cross nodes.

Shards sit on nodes contiguously: with S shards on N nodes, shard s is on node s // (S / N). Between
shards of one node a token's hidden state moves over NVLink (free here); to another node it goes
over the network, once per node however many of its experts that node holds.

DeepSeek-V3 routes group-limited: the E experts form G equal groups (experts g*E/G .. (g+1)*E/G - 1),
a token picks its top groups first (4 of 8), then its experts within them. Keep each group on one
node and a token's experts lie on at most as many nodes as it picks groups::

    plan_node_aware(load [L, E], shards S, redundant R, nodes N, groups G, capacity [S] | None)
        -> [L, S, slots] logical ids (EMPTY pads), slots = ceil((E + R) / S) as ``planner.plan``'s

1. **Groups onto nodes**: G / N groups per node (G must be a multiple of N), heaviest group first,
   each onto the node with room that would finish earliest with it (time = load / the sum of its
   shards' capacities; ties: the lowest node id). Per layer, vectorised over layers.
2. **Within each node**: ``planner.plan`` on the node's E / N experts and S / N shards with R / N
   redundant copies (R must be a multiple of N, as in DeepSeek's EPLB): so an expert's copies stay
   on its group's node, at most one per shard, and the nodes are planned as rows of one call.

The trade: node loads are whole groups' loads, so balancedness is at best mean / max node load,
below the global plan's when groups are unequally hot; in exchange, fewer nodes per token.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from epserve.services.cluster.planner import EMPTY, plan, shard_capacity


def node_of_shard(shards: int, nodes: int) -> torch.Tensor:
    """[S] the node of every shard: shard s is on node s // (S / N)."""
    if nodes < 1 or shards % nodes:
        raise ValueError(f"{shards} shards do not split evenly over {nodes} nodes (need a divisor of {shards})")
    return torch.arange(shards) // (shards // nodes)


def plan_node_aware(load: torch.Tensor, shards: int, redundant: int, nodes: int, groups: int,
                    capacity: torch.Tensor | None = None) -> torch.Tensor:
    """The placement of every layer, each expert group's copies on one node: [L, S, slots] logical ids."""
    load = load.double().clamp(min=0)
    layers, experts = load.shape
    node_of_shard(shards, nodes)
    _check_groups(experts, shards, redundant, nodes, groups)
    node_capacity = shard_capacity(capacity, shards).view(nodes, shards // nodes)                                   # [N, S / N]
    node_experts = _experts_by_node(load, nodes, groups, node_capacity.sum(dim=1))           # [L, N, E / N]
    local_load = load.gather(1, node_experts.flatten(1)).view(layers, nodes, -1)             # [L, N, E / N]
    slots = -(-(experts + redundant) // shards)
    members = torch.full((layers, nodes, shards // nodes, slots), EMPTY, dtype=torch.int64)
    patterns, pattern_of_node = torch.unique(node_capacity, dim=0, return_inverse=True)
    for pattern, speeds in enumerate(patterns):                   # nodes of equal shard speeds: one call
        alike = (pattern_of_node == pattern).nonzero().flatten()
        local = plan(local_load[:, alike].flatten(0, 1), shards // nodes, redundant // nodes, speeds)
        local = local.view(layers, len(alike), shards // nodes, slots)                      # node-local ids
        logical = node_experts[:, alike].gather(2, local.clamp(min=0).flatten(2)).view_as(local)
        members[:, alike] = torch.where(local >= 0, logical, EMPTY)
    return members.view(layers, shards, slots)


def _check_groups(experts: int, shards: int, redundant: int, nodes: int, groups: int) -> None:
    if groups < 1 or experts % groups:
        raise ValueError(f"groups: {experts} experts do not form {groups} equal groups")
    if groups % nodes:
        raise ValueError(f"groups: {groups} groups do not split evenly over {nodes} nodes (each node "
                         f"holds whole groups, the same number of them)")
    most = nodes * (experts // nodes) * (shards // nodes - 1)
    if redundant % nodes or not 0 <= redundant <= most:
        raise ValueError(f"redundant experts must be a multiple of the {nodes} nodes in [0, {most}] (copies "
                         f"stay on their group's node, at most one per shard), got {redundant}")


def _experts_by_node(load: torch.Tensor, nodes: int, groups: int, node_capacity: torch.Tensor) -> torch.Tensor:
    """Groups packed onto nodes (longest first, equal counts) -> [L, N, E / N] each node's experts, ascending."""
    layers, experts = load.shape
    size, per_node = experts // groups, groups // nodes
    group_load = load.view(layers, groups, size).sum(dim=2)                                 # [L, G]
    order = torch.sort(-group_load, dim=1, stable=True).indices
    rows = torch.arange(layers)
    node_load = torch.zeros(layers, nodes, dtype=torch.float64)
    used = torch.zeros(layers, nodes, dtype=torch.int64)
    node_groups = torch.empty(layers, nodes, per_node, dtype=torch.int64)
    for k in range(groups):                                       # one group per layer at a time
        group = order[:, k]
        weight = group_load[rows, group]
        finish = ((node_load + weight[:, None]) / node_capacity).masked_fill(used >= per_node, float("inf"))
        node = finish.argmin(dim=1)                               # ties: the lowest node id
        node_groups[rows, node, used[rows, node]] = group
        node_load[rows, node] += weight
        used[rows, node] += 1
    node_groups = node_groups.sort(dim=2).values
    return (node_groups[..., None] * size + torch.arange(size)).flatten(2)


def cross_node_traffic(routes: Sequence[torch.Tensor], members: torch.Tensor, nodes: int) -> tuple[float, float]:
    """(cross-node fraction, mean remote nodes per token) of ``members`` [L, S, slots], over all layers.

    ``routes[l]`` [T, K]: the logical experts of each of layer l's T tokens. Token t runs attention
    on node t % N and sends its hidden state once to each distinct other node that holds the copy it
    uses of one of its experts (within a node NVLink fans it out, free): for each expert, the copy on
    its own node when there is one, else the copy on the lowest-numbered node that holds it.

    Cross-node fraction: those remote sends / the T x K dispatched (token, expert) pairs, i.e. the
    share of the dispatches that cost a network send, the pairs bound for one node sharing one (in
    [0, 1]). Not remote / all (token, node) sends: keeping groups on nodes cuts a token's local and
    remote sends together, so that ratio does not fall with the traffic. Remote nodes per token:
    remote sends / the (token, layer) pairs.
    """
    layers, shards, _ = members.shape
    if len(routes) != layers:
        raise ValueError(f"routes: {len(routes)} layers for a placement of {layers}")
    experts = int(members.max()) + 1
    shard_node = node_of_shard(shards, nodes)
    remote, dispatches, tokens = 0, 0, 0
    for layer, ids in enumerate(routes):
        ids = ids.long()                                                                    # [T, K]
        holds = torch.zeros(nodes, experts + 1, dtype=torch.bool)                           # column E: EMPTY
        placed = torch.where(members[layer] >= 0, members[layer], experts)                  # [S, slots]
        holds[shard_node[:, None].expand_as(placed), placed] = True
        holds = holds[:, :experts]                                                          # [N, E]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= experts or not bool(holds.any(0)[ids].all())):
            raise ValueError(f"routes: layer {layer} routes to an expert the placement does not hold")
        home = torch.arange(ids.shape[0]) % nodes                                           # [T]
        target = torch.where(holds[home[:, None], ids], home[:, None], holds.int().argmax(dim=0)[ids])  # [T, K]
        reached = torch.zeros(ids.shape[0], nodes, dtype=torch.bool).scatter_(1, target, True)       # [T, N]
        reached[torch.arange(ids.shape[0]), home] = False                                    # local: free
        remote += int(reached.sum())
        dispatches += ids.numel()
        tokens += ids.shape[0]
    if not dispatches:
        raise ValueError("routes: no tokens")
    return remote / dispatches, remote / tokens
