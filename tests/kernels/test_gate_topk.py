"""Group-limited top-k gate: Triton vs torch reference vs a loop-based definition vs transformers."""
import pytest
import torch

from epserve.kernels import backend
from epserve.kernels.gate_topk import gate_topk, gate_topk_reference, gate_topk_triton

pytestmark = pytest.mark.unit

# name: (T, E, n_group, topk_group, top_k)
CASES = {
    "v3_one_token": (1, 256, 8, 4, 8),
    "v3_37_tokens": (37, 256, 8, 4, 8),
    "small": (5, 16, 2, 1, 4),
    "one_group": (6, 12, 1, 1, 5),
    "one_expert_per_group": (7, 8, 8, 3, 2),
    "odd_group_size": (4, 24, 4, 2, 6),
    "all_kept_experts": (3, 16, 4, 2, 8),
}


def _inputs(T: int, E: int, seed: int = 0, bias_scale: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, E, generator=g) * 2, torch.randn(E, generator=g) * bias_scale


def naive_gate_topk(logits, bias, n_group, topk_group, top_k, scaling, norm=True):
    """The routing rule, one token at a time in plain Python."""
    T, E = logits.shape
    size = E // n_group
    all_ids, all_weights = [], []
    for t in range(T):
        scores = [1 / (1 + torch.exp(-logits[t, e].double()).item()) for e in range(E)]
        choice = [scores[e] + bias[e].item() for e in range(E)]
        group_score = [sum(sorted(choice[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        candidates = [e for e in range(E) if e // size in kept]
        ids = sorted(candidates, key=lambda e: -choice[e])[:top_k]
        weights = [scores[e] for e in ids]
        total = sum(weights) + 1e-20 if norm else 1.0
        all_ids.append(ids)
        all_weights.append([w / total * scaling for w in weights])
    return torch.tensor(all_weights, dtype=torch.float32), torch.tensor(all_ids, dtype=torch.int32)


def assert_same_routing(weights, ids, ref_weights, ref_ids, atol=1e-6):
    """Same expert set per token (order free) and the same weight for each expert."""
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert ids.shape == ref_ids.shape and weights.shape == ref_weights.shape
    ids, order = ids.long().sort(dim=1)
    ref_ids, ref_order = ref_ids.long().sort(dim=1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights.gather(1, order), ref_weights.gather(1, ref_order), rtol=1e-5, atol=atol)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_reference_matches_naive(case, norm):
    T, E, n_group, topk_group, top_k = CASES[case]
    logits, bias = _inputs(T, E)
    expected = naive_gate_topk(logits, bias, n_group, topk_group, top_k, 2.5, norm)
    got = gate_topk_reference(logits, bias, n_group, topk_group, top_k, 2.5, norm)
    assert_same_routing(*got, *expected)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference(case, norm):
    T, E, n_group, topk_group, top_k = CASES[case]
    logits, bias = _inputs(T, E, seed=1)
    got = gate_topk_triton(logits, bias, n_group, topk_group, top_k, 2.5, norm)
    expected = gate_topk_reference(logits, bias, n_group, topk_group, top_k, 2.5, norm)
    assert_same_routing(*got, *expected)


@pytest.mark.parametrize("impl", [gate_topk_triton, gate_topk_reference])
def test_bias_changes_selection_not_weights(impl):
    """A large bias on low-scoring experts pulls them in; their weights stay raw sigmoid scores."""
    logits, _ = _inputs(4, 64, seed=2)
    no_bias = torch.zeros(64)
    bias = torch.zeros(64)
    bias[logits.mean(dim=0).argsort()[:8]] = 5.0  # the 8 experts that score lowest on average
    w0, ids0 = impl(logits, no_bias, 8, 4, 6, 1.0, False)
    w1, ids1 = impl(logits, bias, 8, 4, 6, 1.0, False)
    assert not torch.equal(ids0.sort(dim=1)[0], ids1.sort(dim=1)[0])
    assert torch.isin(ids1.long(), bias.nonzero().flatten()).any(dim=1).all()
    torch.testing.assert_close(w1, logits.sigmoid().gather(1, ids1.long()))
    w2, ids2 = impl(logits, bias, 8, 4, 6, 2.5, True)
    raw = logits.sigmoid().gather(1, ids2.long())
    torch.testing.assert_close(w2, raw / raw.sum(dim=1, keepdim=True) * 2.5)


@pytest.mark.parametrize("impl", [gate_topk_triton, gate_topk_reference])
def test_group_limit_is_enforced(impl):
    """The best single experts sit in groups whose top-2 sum loses: they must not be chosen."""
    logits = torch.full((1, 16), -4.0)
    logits[0, 0] = 4.0                # group 0: one star, weak second
    logits[0, 4:6] = 3.0              # group 1: two strong experts
    logits[0, 8:10] = 2.9             # group 2: two strong experts
    weights, ids = impl(logits, torch.zeros(16), 4, 2, 4, 1.0)
    assert sorted(ids[0].tolist()) == [4, 5, 8, 9]
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(1))


def test_ties_pick_lowest_index_in_triton():
    logits = torch.zeros(2, 16)
    weights, ids = gate_topk_triton(logits, torch.zeros(16), 4, 2, 3, 1.0)
    assert ids.tolist() == [[0, 1, 2], [0, 1, 2]]
    torch.testing.assert_close(weights, torch.full((2, 3), 1 / 3))


def test_matches_transformers_router():
    modeling = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    from transformers import DeepseekV3Config

    T, E, n_group, topk_group, top_k, hidden = 37, 256, 8, 4, 8, 64
    config = DeepseekV3Config(hidden_size=hidden, n_routed_experts=E, num_experts_per_tok=top_k, n_group=n_group,
                              topk_group=topk_group, routed_scaling_factor=2.5, norm_topk_prob=True)
    router = modeling.DeepseekV3TopkRouter(config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, hidden, generator=g) * 0.2)
        router.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.1)
        logits, hf_weights, hf_ids = router(torch.randn(T, hidden, generator=g))
    bias = router.e_score_correction_bias
    for impl in (gate_topk_reference, gate_topk_triton):
        weights, ids = impl(logits, bias, n_group, topk_group, top_k, 2.5, True)
        assert_same_routing(weights, ids, hf_weights.float(), hf_ids.int())


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_dispatch_and_empty(name):
    logits, bias = _inputs(0, 16)
    try:
        backend.set_backend(name)
        weights, ids = gate_topk(logits, bias, 2, 1, 4, 1.0)
    finally:
        backend.set_backend(None)
    assert weights.shape == (0, 4) and ids.shape == (0, 4) and ids.dtype == torch.int32


@pytest.mark.parametrize("impl", [gate_topk_triton, gate_topk_reference])
def test_rejects_bad_inputs(impl):
    logits, bias = _inputs(2, 16)
    with pytest.raises(ValueError, match="router_logits"):
        impl(logits.double(), bias, 2, 1, 4, 1.0)
    with pytest.raises(ValueError, match="correction_bias"):
        impl(logits, bias[:8], 2, 1, 4, 1.0)
    with pytest.raises(ValueError, match="n_group"):
        impl(logits, bias, 3, 1, 4, 1.0)
    with pytest.raises(ValueError, match="topk_group"):
        impl(logits, bias, 2, 3, 4, 1.0)
    with pytest.raises(ValueError, match="top_k"):
        impl(logits, bias, 2, 1, 9, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 4096])
def test_triton_cuda_realistic(T):
    logits, bias = _inputs(T, 256, seed=4)
    logits, bias = logits.cuda(), bias.cuda()
    weights, ids = gate_topk_triton(logits, bias, 8, 4, 8, 2.5, True)
    ref_weights, ref_ids = gate_topk_reference(logits, bias, 8, 4, 8, 2.5, True)
    # Float ulps in sigmoid may swap near-tied experts: tolerate that on at most 0.1% of tokens.
    same = (ids.long().sort(dim=1)[0] == ref_ids.long().sort(dim=1)[0]).all(dim=1)
    assert same.float().mean() >= 0.999
    assert_same_routing(weights[same].cpu(), ids[same].cpu(), ref_weights[same].cpu(), ref_ids[same].cpu())
