"""The placement planner: which logical experts each shard holds in each MoE layer, from their load.

A pure function, vectorised over layers (no Python loop over experts or shards)::

    plan(load [L, E], shards S, redundant R, capacity [S] | None) -> [L, S, slots] logical ids (EMPTY pads)

1. **Replicate**: R times, give one more copy to the expert with the most load per copy (never more
   copies than shards). A copy carries load / copies of its expert.
2. **Pack** (longest processing time first): copies in order of load per copy, each onto the shard
   that would finish earliest with it (time = load / capacity) among those with a free slot and no
   copy of that expert yet; done for two orders of equal loads, and the better kept per layer.
3. **Refine**: while some layer's slowest shard can get faster by moving one of its copies to
   another shard's free slot or by swapping it with a lighter copy there (constraints kept), make
   the move that lowers the pair's longer time the most. Never worse than step 2.

Balancedness of a layer is mean shard time / max shard time (1 = perfect); of a placement, the
mean over layers. ``capacity`` is each shard's relative speed (default all 1): a shard of
capacity 0.5 is given half the load, and, the packing being greedy by size, the coldest experts.
Each expert group kept on one node, and how many dispatches cross nodes: ``node_planner``.
"""
from __future__ import annotations

import torch

EMPTY = -1
_REFINE_STEPS = 400          # moves at most per layer; each lowers its slowest shard's time


def replicate(load: torch.Tensor, redundant: int, shards: int) -> torch.Tensor:
    """load [L, E] -> copies [L, E] int64 (sum E + redundant per layer, each in [1, shards])."""
    layers, experts = load.shape
    copies = torch.ones(layers, experts, dtype=torch.int64)
    rows = torch.arange(layers)
    for _ in range(redundant):
        per_copy = (load / copies).masked_fill(copies >= shards, -1.0)
        copies[rows, per_copy.argmax(dim=1)] += 1                 # ties: the lowest expert id
    return copies


def shard_capacity(capacity: torch.Tensor | None, shards: int) -> torch.Tensor:
    """[S] float64: each shard's relative speed, all 1 when None; checked."""
    capacity = torch.ones(shards, dtype=torch.float64) if capacity is None else capacity.double()
    if capacity.shape != (shards,) or not bool((capacity > 0).all()):
        raise ValueError(f"capacity must be {shards} positive numbers, got {capacity.tolist()}")
    return capacity


def plan(load: torch.Tensor, shards: int, redundant: int, capacity: torch.Tensor | None = None) -> torch.Tensor:
    """The placement of every layer: [L, S, slots_per_shard] logical expert ids, EMPTY where unused."""
    load = load.double().clamp(min=0)
    layers, experts = load.shape
    capacity = shard_capacity(capacity, shards)
    if not 0 <= redundant <= experts * (shards - 1):
        raise ValueError(f"redundant experts must be in [0, {experts * (shards - 1)}] "
                         f"(at most one copy of an expert per shard), got {redundant}")
    slots = -(-(experts + redundant) // shards)
    copies = replicate(load, redundant, shards)
    best, best_time = None, None
    for ids, weights in _orders(load, copies):                       # [L, E + R], heaviest copy first
        members, member_load = _pack(ids, weights, shards, slots, experts, capacity)
        members, member_load = _refine(members, member_load, capacity, experts)
        time = (member_load.sum(dim=2) / capacity).max(dim=1).values                   # [L]
        if best is None:
            best, best_time = members, time
            continue
        better = time < best_time                                    # per layer, the faster of the two
        best[better], best_time = members[better], torch.minimum(time, best_time)
    order = torch.where(best == EMPTY, experts, best).argsort(dim=2)             # each shard's experts sorted
    return best.gather(2, order)


def _orders(load: torch.Tensor, copies: torch.Tensor):
    """Every copy of every expert, heaviest first, in two orders of equal loads: by expert id (stable),
    and as ``torch.sort(descending=True)`` leaves them (EPLB's order). Packing both and keeping the
    better layer by layer costs twice the time and is never worse than either."""
    layers, experts = load.shape
    ids = torch.arange(experts).expand(layers, experts)
    ids = torch.stack([torch.repeat_interleave(ids[l], copies[l]) for l in range(layers)])   # [L, E + R]
    weights = (load / copies).gather(1, ids)
    for order in (torch.sort(-weights, dim=1, stable=True).indices, torch.sort(weights, dim=1, descending=True).indices):
        yield ids.gather(1, order), weights.gather(1, order)


def _pack(ids, weights, shards: int, slots: int, experts: int, capacity: torch.Tensor):
    """LPT over every layer at once -> members [L, S, slots] ids (EMPTY) and their loads [L, S, slots]."""
    layers, items = ids.shape
    rows = torch.arange(layers)
    shard_load = torch.zeros(layers, shards, dtype=torch.float64)
    used = torch.zeros(layers, shards, dtype=torch.int64)
    holds = torch.zeros(layers, shards, experts, dtype=torch.bool)
    members = torch.full((layers, shards, slots), EMPTY, dtype=torch.int64)
    member_load = torch.zeros(layers, shards, slots, dtype=torch.float64)
    state = (members, member_load, shard_load, used, holds)
    for k in range(items):                                          # one copy per layer at a time
        expert, weight = ids[:, k], weights[:, k]
        ok = (used < slots) & ~holds[rows, :, expert]               # [L, S]
        finish = ((shard_load + weight[:, None]) / capacity).masked_fill(~ok, float("inf"))
        shard = finish.argmin(dim=1)                                # ties: the lowest shard id
        for row in (~ok.any(dim=1)).nonzero().flatten().tolist():    # cornered (rare): make room
            shard[row] = _make_room(state, row, int(expert[row]), slots)
        members[rows, shard, used[rows, shard]] = expert
        member_load[rows, shard, used[rows, shard]] = weight
        shard_load[rows, shard] += weight
        used[rows, shard] += 1
        holds[rows, shard, expert] = True
    return members, member_load


def _make_room(state, row: int, expert: int, slots: int) -> int:
    """No shard of layer ``row`` can take a copy of ``expert``: each one with a free slot already holds
    it. Move a copy ``x`` from a full shard ``t`` without ``expert`` to such a shard ``s`` (one exists:
    if ``s`` held all of ``t``'s copies, plus ``expert``, it would be full) -> ``t``, now free for it."""
    members, member_load, shard_load, used, holds = state
    s = int((used[row] < slots).nonzero()[0])
    for t in (~holds[row, :, expert]).nonzero().flatten().tolist():
        for i in range(int(used[row, t])):
            x = int(members[row, t, i])
            if not holds[row, s, x]:
                w = member_load[row, t, i].clone()
                last = int(used[row, t]) - 1                         # t's last copy fills the hole
                members[row, t, i], member_load[row, t, i] = members[row, t, last], member_load[row, t, last]
                members[row, t, last], member_load[row, t, last] = EMPTY, 0.0
                members[row, s, used[row, s]], member_load[row, s, used[row, s]] = x, w
                used[row, t] -= 1
                used[row, s] += 1
                shard_load[row, t] -= w
                shard_load[row, s] += w
                holds[row, t, x], holds[row, s, x] = False, True
                return t
    raise AssertionError(f"layer row {row}: no room for a copy of expert {expert}")


def _refine(members, member_load, capacity: torch.Tensor, experts: int):
    """Moves and swaps off each layer's slowest shard while one makes that pair's longer time shorter."""
    layers, shards, slots = members.shape
    rows = torch.arange(layers)
    holds = torch.zeros(layers, shards, experts + 1, dtype=torch.bool)              # column E: EMPTY
    holds.scatter_(2, torch.where(members >= 0, members, experts), True)
    holds = holds[:, :, :experts].clone()                                          # [L, S, E]
    for _ in range(_REFINE_STEPS):
        time = member_load.sum(dim=2) / capacity                          # [L, S]
        slow = time.argmax(dim=1)                                          # [L]
        a_id, a_load = members[rows, slow], member_load[rows, slow]        # [L, slots]: copies on the slow shard
        delta = a_load[:, :, None, None] - member_load[:, None]           # [L, a, S, b]: load moved to s
        new_slow = (time[rows, slow][:, None, None, None] - delta / capacity[slow][:, None, None, None])
        new_other = time[:, None, :, None] + delta / capacity[None, None, :, None]
        worse = torch.maximum(new_slow, new_other)
        a_free = holds.gather(2, a_id.clamp(min=0)[:, None, :].expand(-1, shards, -1))   # [L, S, a]: s holds a
        b_on_slow = holds[rows, slow].gather(1, members.clamp(min=0).view(layers, -1)).view(layers, shards, slots)
        allowed = ((a_id >= 0)[:, :, None, None] & (delta > 0)
                   & ~a_free.transpose(1, 2)[:, :, :, None]                # a's expert not on s yet
                   & ~((members >= 0) & b_on_slow)[:, None]                # b's expert not on the slow shard
                   & (torch.arange(shards)[None, :] != slow[:, None])[:, None, :, None])
        worse = worse.masked_fill(~allowed, float("inf"))
        best, flat = worse.view(layers, -1).min(dim=1)
        improves = best < time[rows, slow] * (1 - 1e-12)
        if not bool(improves.any()):
            break
        a, s, b = _unravel(flat, (slots, shards, slots))
        r = rows[improves]
        a, s, b, slow_r = a[improves], s[improves], b[improves], slow[improves]
        moved_a, moved_b = members[r, slow_r, a].clone(), members[r, s, b].clone()
        load_a, load_b = member_load[r, slow_r, a].clone(), member_load[r, s, b].clone()
        members[r, slow_r, a], members[r, s, b] = moved_b, moved_a
        member_load[r, slow_r, a], member_load[r, s, b] = load_b, load_a
        holds[r, slow_r, moved_a], holds[r, s, moved_a] = False, True
        real_b = moved_b >= 0                                                   # a swap, not a move
        holds[r[real_b], s[real_b], moved_b[real_b]] = False
        holds[r[real_b], slow_r[real_b], moved_b[real_b]] = True
    return members, member_load


def _unravel(flat: torch.Tensor, shape: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    a_size, s_size, b_size = shape
    return flat // (s_size * b_size), (flat // b_size) % s_size, flat % b_size


def shard_times(load: torch.Tensor, members: torch.Tensor, capacity: torch.Tensor | None = None) -> torch.Tensor:
    """Expected time of every shard [L, S]: the load of its copies (load / copies each) / its capacity."""
    load = load.double()
    layers, experts = load.shape
    shards = members.shape[1]
    copies = torch.zeros(layers, experts + 1, dtype=torch.float64)
    index = torch.where(members >= 0, members, experts).view(layers, -1)
    copies.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float64))
    per_copy = torch.cat([load / copies[:, :experts].clamp(min=1), torch.zeros(layers, 1, dtype=torch.float64)], 1)
    shard_load = per_copy.gather(1, index).view(layers, shards, -1).sum(dim=2)
    return shard_load / (torch.ones(shards, dtype=torch.float64) if capacity is None else capacity.double())


def layer_balancedness(load: torch.Tensor, members: torch.Tensor, capacity: torch.Tensor | None = None) -> torch.Tensor:
    """Per layer [L]: mean shard time / max shard time (1 = perfectly balanced)."""
    time = shard_times(load, members, capacity)
    return time.mean(dim=1) / time.max(dim=1).values.clamp(min=1e-12)


def balancedness(load: torch.Tensor, members: torch.Tensor, capacity: torch.Tensor | None = None) -> float:
    """The mean over layers of ``layer_balancedness``."""
    return float(layer_balancedness(load, members, capacity).mean())
