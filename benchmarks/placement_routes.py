"""Synthetic group-limited routes, as DeepSeek-V3's gate makes them, for the placement benchmark.

Per layer, every expert gets a preference from a Zipf law over a random order of the experts, and
every group one from a Zipf law over a random order of the groups. A token's score for an expert is
log(expert preference) + log(its group's preference) + Gumbel noise (so that, without the group
limit, its top-k would be a draw without replacement in proportion to the preferences). Then, as in
V3's gate: a group's score is the sum of its two best experts' scores, the token keeps its
``topk_group`` best groups, and takes its ``topk`` best experts within them.
"""
from __future__ import annotations

import torch


def zipf_preference(size: int, exponent: float, generator: torch.Generator) -> torch.Tensor:
    """[size]: 1 / rank ** exponent over a random order (exponent 0: uniform)."""
    return 1.0 / (torch.randperm(size, generator=generator) + 1).double() ** exponent


def group_limited_routes(layers: int, experts: int, groups: int, topk: int, topk_group: int, tokens: int,
                         expert_zipf: float, group_zipf: float, generator: torch.Generator) -> torch.Tensor:
    """[L, T, K] logical expert ids: each token's ``topk`` experts, from ``topk_group`` of the groups."""
    size = experts // groups
    routes = torch.empty(layers, tokens, topk, dtype=torch.int64)
    for layer in range(layers):
        prior = (zipf_preference(experts, expert_zipf, generator).log()
                 + zipf_preference(groups, group_zipf, generator).log().repeat_interleave(size))   # [E]
        noise = -torch.empty(tokens, experts, dtype=torch.float64).exponential_(generator=generator).log()
        scores = prior + noise                                                                    # [T, E]
        group_score = scores.view(tokens, groups, size).topk(2, dim=2).values.sum(dim=2)         # [T, G]
        kept = torch.zeros(tokens, groups, dtype=torch.bool)
        kept.scatter_(1, group_score.topk(topk_group, dim=1).indices, True)
        scores = scores.masked_fill(~kept.repeat_interleave(size, dim=1), float("-inf"))
        routes[layer] = scores.topk(topk, dim=1).indices
    return routes


def route_counts(routes: torch.Tensor, experts: int) -> torch.Tensor:
    """[L, T, K] routes -> [L, E] float64: tokens per expert (the load the routes put on each)."""
    ones = torch.ones(routes.shape[0], routes[0].numel(), dtype=torch.float64)
    return torch.zeros(routes.shape[0], experts, dtype=torch.float64).scatter_add_(1, routes.flatten(1), ones)
