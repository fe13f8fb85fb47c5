"""Expert placement: logical experts -> physical slots on expert shards, per MoE layer.

Every shard holds ``slots_per_shard`` physical slots in every MoE layer. ``E + R`` slots are used:
each logical expert once, plus R redundant copies of the hottest experts (by expected load), never
two copies of one expert on the same shard; surplus slots (when S does not divide E + R) are empty.
``planner.plan`` decides which (balanced expected load per shard). Top-k ids are remapped logical -> physical right after the gate,
spreading a replicated expert's tokens over its copies.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from epserve.services.cluster.planner import EMPTY, plan


@dataclass(frozen=True)
class Placement:
    version: int
    num_experts: int                         # E logical experts per MoE layer
    num_shards: int                          # S
    slots_per_shard: int
    moe_layers: tuple[int, ...]              # checkpoint layer index of each row
    physical_to_logical: torch.Tensor        # [rows, S * slots_per_shard] int64, EMPTY for unused slots
    logical_to_physical: torch.Tensor = field(init=False)   # [rows, E, max_replicas] int64, EMPTY padded
    replica_counts: torch.Tensor = field(init=False)        # [rows, E] int64
    _on_device: dict = field(init=False, repr=False, compare=False)   # device -> (logical_to_physical, replica_counts)
    _shards_in_use: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        p2l = self.physical_to_logical
        assert p2l.shape == (len(self.moe_layers), self.num_shards * self.slots_per_shard), p2l.shape
        counts = torch.stack([torch.bincount(row[row >= 0], minlength=self.num_experts) for row in p2l])
        assert (counts >= 1).all(), "every logical expert needs a slot in every layer"
        l2p = torch.full((len(self.moe_layers), self.num_experts, int(counts.max())), EMPTY, dtype=torch.int64)
        for r, row in enumerate(p2l.tolist()):
            filled = [0] * self.num_experts
            for slot, expert in enumerate(row):
                if expert != EMPTY:
                    l2p[r, expert, filled[expert]] = slot
                    filled[expert] += 1
        object.__setattr__(self, "logical_to_physical", l2p)
        object.__setattr__(self, "replica_counts", counts)
        object.__setattr__(self, "_on_device", {torch.device("cpu"): (l2p, counts)})
        in_use = (self.members() != EMPTY).any(dim=2).any(dim=0).nonzero().flatten().tolist()
        object.__setattr__(self, "_shards_in_use", tuple(in_use))

    # ---- lookups ---------------------------------------------------------------------------
    def row(self, layer: int) -> int:
        return self.moe_layers.index(layer)

    def shard_of_slot(self, slot: int) -> int:
        return slot // self.slots_per_shard

    def shards_in_use(self) -> list[int]:
        """The shards that hold a slot in some layer (a fail-over placement leaves dead shards out)."""
        return list(self._shards_in_use)

    def members(self) -> torch.Tensor:
        """[rows, S, slots_per_shard] logical expert per slot of each shard (EMPTY: unused)."""
        return self.physical_to_logical.view(len(self.moe_layers), self.num_shards, self.slots_per_shard)

    def local_experts(self, layer: int, shard: int) -> list[int]:
        """Logical expert in each of ``shard``'s local slots for ``layer`` (EMPTY for an unused slot)."""
        start = shard * self.slots_per_shard
        return self.physical_to_logical[self.row(layer), start:start + self.slots_per_shard].tolist()

    def tables_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(logical_to_physical, replica_counts) on ``device``, copied there once: a copy per lookup would
        be a host-to-device copy, and a device sync, per MoE layer."""
        tables = self._on_device.get(device)
        if tables is None:
            tables = self._on_device[device] = (self.logical_to_physical.to(device), self.replica_counts.to(device))
        return tables

    def to_physical(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """topk_ids [tokens, k] logical -> physical slots [tokens, k] int64, spreading tokens over replicas
        (token t's choice j takes copy (t + j) mod copies), on topk_ids' device without a device sync."""
        if topk_ids.device.type == "cpu":
            return self._to_physical_host(self.row(layer), topk_ids)
        return self._to_physical_torch(self.row(layer), topk_ids)

    def _to_physical_host(self, row: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """``to_physical`` in numpy: at decode sizes, torch's per-call cost is most of the lookup."""
        ids = topk_ids.numpy()
        logical_to_physical, replica_counts = self.logical_to_physical.numpy()[row], self.replica_counts.numpy()[row]
        return torch.from_numpy(logical_to_physical[ids, _spread(*ids.shape) % replica_counts[ids]])

    def _to_physical_torch(self, row: int, topk_ids: torch.Tensor) -> torch.Tensor:
        ids = topk_ids.long()
        logical_to_physical, replica_counts = self.tables_on(ids.device)
        counts = replica_counts[row][ids]                                                 # [tokens, k]
        tokens, k = ids.shape
        spread = torch.arange(tokens, device=ids.device)[:, None] + torch.arange(k, device=ids.device)[None, :]
        choice = spread % counts
        return logical_to_physical[row][ids, choice]

    # ---- serialisation ---------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"version": self.version, "num_experts": self.num_experts, "num_shards": self.num_shards,
                           "slots_per_shard": self.slots_per_shard, "moe_layers": list(self.moe_layers),
                           "physical_to_logical": self.physical_to_logical.tolist()})

    @classmethod
    def from_json(cls, text: str) -> "Placement":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, raw: dict) -> "Placement":
        return cls(raw["version"], raw["num_experts"], raw["num_shards"], raw["slots_per_shard"],
                   tuple(raw["moe_layers"]), torch.tensor(raw["physical_to_logical"], dtype=torch.int64))

    def expected_shard_load(self, load: torch.Tensor) -> torch.Tensor:
        """load [rows, E] tokens per logical expert -> [rows, S] expected tokens per shard."""
        per_copy = load / self.replica_counts                                             # [rows, E]
        p2l = self.physical_to_logical
        slot_load = torch.where(p2l >= 0, per_copy.gather(1, p2l.clamp(min=0)), torch.zeros(()))
        return slot_load.view(len(self.moe_layers), self.num_shards, self.slots_per_shard).sum(-1)


@functools.lru_cache(maxsize=256)
def _spread(tokens: int, k: int) -> np.ndarray:
    """[tokens, k]: token t's choice j takes copy (t + j) mod copies (read-only: it is shared)."""
    spread = np.add.outer(np.arange(tokens), np.arange(k))
    spread.flags.writeable = False
    return spread


def build_placement(num_experts: int, num_shards: int, redundant: int, moe_layers: Sequence[int],
                    load: torch.Tensor | None = None, version: int = 1,
                    capacity: torch.Tensor | None = None, shards: Sequence[int] | None = None) -> Placement:
    """Place E experts + ``redundant`` hot copies on ``num_shards`` shards for every MoE layer
    (``planner.plan``). ``load [rows, E]`` is the expected tokens per logical expert (None: uniform);
    ``capacity [S]`` the shards' relative speeds (None: equal). ``shards`` (default: all) are the
    shards to place on: the others hold nothing (fail-over onto survivors; at most one copy of an
    expert per shard, so fewer shards may take fewer redundant copies)."""
    if num_shards < 1:
        raise ValueError(f"expert shards must be >= 1, got {num_shards}")
    rows = len(moe_layers)
    load = torch.ones(rows, num_experts, dtype=torch.float64) if load is None else load
    if load.shape != (rows, num_experts):
        raise ValueError(f"load must be [{rows}, {num_experts}], got {tuple(load.shape)}")
    used = list(range(num_shards)) if shards is None else sorted(set(shards))
    if not used or not all(0 <= s < num_shards for s in used):
        raise ValueError(f"shards must be a non-empty subset of [0, {num_shards}), got {list(shards or [])}")
    capacity = None if capacity is None else capacity[used]
    if shards is not None:                      # survivors: as many copies as they can hold
        redundant = min(redundant, num_experts * (len(used) - 1))
    placed = plan(load, len(used), redundant, capacity)                           # [rows, len(used), slots]
    members = torch.full((rows, num_shards, placed.shape[2]), EMPTY, dtype=torch.int64)
    members[:, used] = placed
    return Placement(version, num_experts, num_shards, members.shape[2], tuple(moe_layers), members.view(rows, -1))
