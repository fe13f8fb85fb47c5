"""Fused DeepSeek-V3 gate: sigmoid scores, correction bias, group-limited top-k, weight renorm.

Exactly transformers' ``DeepseekV3TopkRouter`` after its gate GEMM (``router_logits [T, E]``)::

    scores            = sigmoid(router_logits)                       # [T, E]
    scores_for_choice = scores + correction_bias                     # bias only picks experts
    group_scores      = sum of the top-2 scores_for_choice per group # [T, n_group] (top-1 if 1/group)
    keep the topk_group best groups; experts of other groups are -inf
    topk_ids          = top_k of the masked scores_for_choice        # [T, top_k] int32
    topk_weights      = scores[topk_ids] (raw sigmoid, not biased), / their sum if norm_topk_prob,
                        * routed_scaling_factor                      # [T, top_k] float32

Order within a row is unspecified. ``gate_topk`` dispatches to ``gate_topk_triton`` (CUDA) or
``gate_topk_reference`` (torch). The Triton kernel runs one program per token, holding the E
scores as an [n_group, E / n_group] tile in registers, and picks by iterative argmax
(ties go to the lowest index).
"""
import torch
import triton
import triton.language as tl

from epserve.kernels.backend import use_triton


@triton.jit
def _argmax_1d(values, index, NONE: tl.constexpr):
    """Lowest ``index`` holding the largest of ``values [n]`` (``NONE`` if none does)."""
    best = tl.max(values, axis=0)
    return tl.min(tl.where(values == best, index, NONE), axis=0)


@triton.jit
def _argmax_2d(values, index, NONE: tl.constexpr):
    """Lowest ``index`` holding the largest of ``values [n, m]`` (``NONE`` if none does)."""
    best = tl.max(tl.max(values, axis=1), axis=0)
    return tl.min(tl.min(tl.where(values == best, index, NONE), axis=1), axis=0)


@triton.jit
def _gate_topk_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr,
    stride_lt, stride_wt, stride_it,
    routed_scaling_factor,
    N_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr, TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr,
    NORM_TOPK_PROB: tl.constexpr, G_PAD: tl.constexpr, GS_PAD: tl.constexpr, K_PAD: tl.constexpr,
):
    """One program routes one token."""
    t = tl.program_id(0)
    g = tl.arange(0, G_PAD)
    j = tl.arange(0, GS_PAD)
    valid = (g[:, None] < N_GROUP) & (j[None, :] < GROUP_SIZE)         # [G_PAD, GS_PAD]
    expert = g[:, None] * GROUP_SIZE + j[None, :]
    logits = tl.load(logits_ptr + t * stride_lt + expert, mask=valid, other=0.0)
    bias = tl.load(bias_ptr + expert, mask=valid, other=0.0)
    expert = tl.where(valid, expert, -1)                                # padding matches no id
    scores = tl.sigmoid(logits.to(tl.float32))
    choice = tl.where(valid, scores + bias, float("-inf"))

    # Group score = sum of the group's top-2 choice scores (just its top-1 for one-expert groups).
    top1 = tl.max(choice, axis=1)                                       # [G_PAD]
    group_score = top1
    if GROUP_SIZE > 1:
        first = tl.min(tl.where(choice == top1[:, None], j[None, :], GS_PAD), axis=1)
        top2 = tl.max(tl.where(j[None, :] == first[:, None], float("-inf"), choice), axis=1)
        group_score = top1 + top2

    kept = g < 0                                                        # [G_PAD] all False
    for _ in tl.static_range(TOPK_GROUP):
        best_g = _argmax_1d(group_score, g, G_PAD)
        kept = kept | (g == best_g)
        group_score = tl.where(g == best_g, float("-inf"), group_score)
    choice = tl.where(kept[:, None], choice, float("-inf"))

    slot = tl.arange(0, K_PAD)
    weights = tl.zeros([K_PAD], dtype=tl.float32)
    ids = tl.zeros([K_PAD], dtype=tl.int32)
    for i in tl.static_range(TOP_K):
        best_e = _argmax_2d(choice, expert, G_PAD * GS_PAD)
        hit = expert == best_e
        w = tl.sum(tl.sum(tl.where(hit, scores, 0.0), axis=1), axis=0)
        weights = tl.where(slot == i, w, weights)
        ids = tl.where(slot == i, best_e, ids)
        choice = tl.where(hit, float("-inf"), choice)

    if NORM_TOPK_PROB:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    weights = weights * routed_scaling_factor
    tl.store(weights_ptr + t * stride_wt + slot, weights, mask=slot < TOP_K)
    tl.store(ids_ptr + t * stride_it + slot, ids, mask=slot < TOP_K)


def _check_inputs(router_logits, correction_bias, n_group, topk_group, top_k) -> None:
    if router_logits.dim() != 2 or router_logits.dtype != torch.float32:
        raise ValueError(f"router_logits must be float32 [T, E], got {router_logits.dtype} "
                         f"{tuple(router_logits.shape)}")
    E = router_logits.shape[1]
    if correction_bias.shape != (E,) or correction_bias.dtype != torch.float32:
        raise ValueError(f"correction_bias must be float32 [{E}], got {correction_bias.dtype} "
                         f"{tuple(correction_bias.shape)}")
    if correction_bias.device != router_logits.device:
        raise ValueError(f"correction_bias is on {correction_bias.device}, router_logits on "
                         f"{router_logits.device}")
    if n_group <= 0 or E % n_group:
        raise ValueError(f"n_group={n_group} must divide the number of experts E={E}")
    if not 0 < topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
    if not 0 < top_k <= topk_group * (E // n_group):
        raise ValueError(f"top_k={top_k} must be in [1, {topk_group * (E // n_group)}] "
                         f"(experts in the {topk_group} kept groups)")


def gate_topk_triton(router_logits: torch.Tensor, correction_bias: torch.Tensor, n_group: int, topk_group: int,
                     top_k: int, routed_scaling_factor: float,
                     norm_topk_prob: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: ``router_logits [T, E]`` -> ``(topk_weights [T, top_k] f32, topk_ids [T, top_k] i32)``."""
    _check_inputs(router_logits, correction_bias, n_group, topk_group, top_k)
    T, E = router_logits.shape
    weights = torch.empty((T, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((T, top_k), dtype=torch.int32, device=router_logits.device)
    if T == 0:
        return weights, ids
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    group_size = E // n_group
    _gate_topk_kernel[(T,)](
        router_logits, correction_bias.contiguous(), weights, ids,
        router_logits.stride(0), weights.stride(0), ids.stride(0),
        float(routed_scaling_factor),
        N_GROUP=n_group, GROUP_SIZE=group_size, TOPK_GROUP=topk_group, TOP_K=top_k,
        NORM_TOPK_PROB=bool(norm_topk_prob), G_PAD=triton.next_power_of_2(n_group),
        GS_PAD=triton.next_power_of_2(group_size), K_PAD=triton.next_power_of_2(top_k),
        num_warps=1 if E <= 256 else 4,
    )
    return weights, ids


def gate_topk_reference(router_logits: torch.Tensor, correction_bias: torch.Tensor, n_group: int,
                        topk_group: int, top_k: int, routed_scaling_factor: float,
                        norm_topk_prob: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch: same contract as :func:`gate_topk_triton` (transformers' DeepseekV3TopkRouter math)."""
    _check_inputs(router_logits, correction_bias, n_group, topk_group, top_k)
    T, E = router_logits.shape
    scores = router_logits.sigmoid()                                          # [T, E]
    choice = scores + correction_bias
    grouped = choice.view(T, n_group, E // n_group)
    group_scores = grouped.topk(min(2, E // n_group), dim=-1)[0].sum(dim=-1)  # [T, n_group]
    group_idx = group_scores.topk(topk_group, dim=-1)[1]                      # [T, topk_group]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    choice = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(T, E)
    topk_ids = choice.topk(top_k, dim=-1)[1]                                  # [T, top_k]
    topk_weights = scores.gather(1, topk_ids)
    if norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_weights * routed_scaling_factor, topk_ids.to(torch.int32)


def gate_topk(router_logits: torch.Tensor, correction_bias: torch.Tensor, n_group: int, topk_group: int,
              top_k: int, routed_scaling_factor: float,
              norm_topk_prob: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``router_logits [T, E]`` -> ``(topk_weights [T, top_k] f32, topk_ids [T, top_k] i32)``: Triton
    when ``use_triton(router_logits)``, else the torch reference."""
    args = (router_logits, correction_bias, n_group, topk_group, top_k, routed_scaling_factor, norm_topk_prob)
    if use_triton(router_logits):
        return gate_topk_triton(*args)
    return gate_topk_reference(*args)
