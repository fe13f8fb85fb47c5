"""Fused MoE: moe_align properties, reference vs a naive loop, Triton vs reference (edge cases, FP8)."""
import pytest
import torch
import torch.nn.functional as F

from epserve.kernels import backend
from epserve.kernels.fp8 import FP8_BLOCK, FP8_DTYPE, fp8_weight_dequant
from epserve.kernels.fused_moe import fused_moe, fused_moe_reference, fused_moe_torch, fused_moe_triton
from epserve.kernels.moe_align import moe_align, moe_align_reference, moe_align_triton

pytestmark = pytest.mark.unit

# Triton runs on CUDA tensors where there is a GPU, else in the interpreter on CPU tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
SMALL = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def random_ids(num_tokens, num_experts, top_k, drop=0.0, gen=None, device=DEVICE):
    """Distinct experts per token (like a real top-k), a fraction ``drop`` replaced by -1."""
    scores = torch.rand(num_tokens, num_experts, generator=gen, device=device)
    ids = scores.topk(top_k, dim=1).indices
    dropped = torch.rand(num_tokens, top_k, generator=gen, device=device) < drop
    return torch.where(dropped, -1, ids)


def make_moe(T, D, I, E, K, dtype, ids=None, drop=0.0, fp8=False, seed=0, device=DEVICE):
    """Random MoE inputs: returns (args, scale kwargs)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, D, generator=gen, device=device).to(dtype)
    ids = random_ids(T, E, K, drop, gen, device) if ids is None else ids.to(device)
    weights = torch.rand(ids.shape, generator=gen, device=device)
    shapes = ((I, D), (I, D), (D, I))                                      # gate, up, down
    if fp8:
        ws = [torch.randn(E, n, k, generator=gen, device=device).to(FP8_DTYPE) for n, k in shapes]
        scales = [(0.5 + torch.rand(E, -(-n // FP8_BLOCK), -(-k // FP8_BLOCK), generator=gen, device=device))
                  / k ** 0.5 for n, k in shapes]
        kw = dict(w_gate_scale=scales[0], w_up_scale=scales[1], w_down_scale=scales[2])
    else:
        ws = [(torch.randn(E, n, k, generator=gen, device=device) / k ** 0.5).to(dtype) for n, k in shapes]
        kw = {}
    return (x, *ws, weights, ids), kw


def naive_moe(x, w_gate, w_up, w_down, topk_weights, topk_ids):
    """Obviously-correct per-token, per-choice loop in float64 (float weights only)."""
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for t in range(x.shape[0]):
        xt = x[t].double()
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            if e == -1:
                continue
            h = F.silu(w_gate[e].double() @ xt) * (w_up[e].double() @ xt)
            out[t] += float(topk_weights[t, k]) * (w_down[e].double() @ h)
    return out


def assert_close_rel(actual, expected, tol):
    """max |actual - expected| <= tol * max |expected| (plus a tiny floor for all-zero outputs)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale + 1e-6, f"max abs err {err:.3g} vs max |ref| {scale:.3g} (tol {tol})"


# ---------------------------------------------------------------------------------------------
# moe_align
# ---------------------------------------------------------------------------------------------
def align_exact(topk_ids, num_experts, block_m):
    """``moe_align`` cut to its ``P`` used rows (one host sync): ``sorted_ids [P]``, ``expert_ids
    [P // block_m]``, ``num_post_padded [1]``."""
    sorted_ids, expert_ids, num_post_padded = moe_align(topk_ids, num_experts, block_m)
    p = int(num_post_padded.item())
    return sorted_ids[:p], expert_ids[: p // block_m], num_post_padded


def check_align(topk_ids, num_experts, block_m):
    sorted_ids, expert_ids, num_post_padded = align_exact(topk_ids, num_experts, block_m)
    T, K = topk_ids.shape
    sentinel = T * K
    P = sorted_ids.numel()
    assert sorted_ids.dtype == expert_ids.dtype == num_post_padded.dtype == torch.int32
    assert num_post_padded.tolist() == [P] and P % block_m == 0 and expert_ids.numel() == P // block_m

    flat = topk_ids.reshape(-1)
    valid = torch.nonzero(flat >= 0).flatten()
    real = sorted_ids[sorted_ids != sentinel].long()
    assert sorted(real.tolist()) == valid.tolist()                       # every valid choice once
    assert ((sorted_ids >= 0) & (sorted_ids <= sentinel)).all()

    row_expert = expert_ids.long().repeat_interleave(block_m)             # [P]
    assert (flat[real] == row_expert[sorted_ids != sentinel]).all()      # block expert is right
    assert (expert_ids[1:] >= expert_ids[:-1]).all()                      # grouped by expert
    counts = torch.bincount(flat[valid], minlength=num_experts)
    blocks = torch.bincount(expert_ids.long(), minlength=num_experts)
    assert (blocks == (counts + block_m - 1) // block_m).all()            # minimal padding
    for b in range(P // block_m):                                         # padding at group ends
        row = sorted_ids[b * block_m:(b + 1) * block_m]
        is_pad = row == sentinel
        assert not (is_pad[:-1] & ~is_pad[1:]).any()
    return sorted_ids, expert_ids


@pytest.mark.parametrize("T,K,E,block_m,drop", [
    (1, 1, 4, 16, 0.0), (1, 8, 256, 16, 0.0), (37, 2, 8, 16, 0.0), (64, 8, 256, 16, 0.3),
    (100, 4, 16, 32, 0.5), (33, 6, 64, 64, 0.1),
])
def test_align_properties(T, K, E, block_m, drop):
    check_align(random_ids(T, E, K, drop, torch.Generator(DEVICE).manual_seed(T)), E, block_m)


@pytest.mark.parametrize("T,K,E,block_m,drop", [
    (1, 8, 256, 16, 0.0), (64, 8, 256, 16, 0.3), (37, 2, 5, 16, 0.0), (300, 8, 40, 64, 0.1),
    (4, 2, 4, 16, 1.0), (0, 2, 4, 16, 0.0),
])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_align_triton_matches_reference(T, K, E, block_m, drop, dtype):
    ids = random_ids(T, E, K, drop, torch.Generator(DEVICE).manual_seed(T)).to(dtype)
    for got, want in zip(moe_align_triton(ids, E, block_m), moe_align_reference(ids, E, block_m)):
        assert torch.equal(got, want)


def test_align_worked_example():
    ids = torch.tensor([[2], [0], [2], [-1]], device=DEVICE)
    sorted_ids, expert_ids, num = align_exact(ids, 3, 4)
    assert sorted_ids.tolist() == [1, 4, 4, 4, 0, 2, 4, 4]
    assert expert_ids.tolist() == [0, 2] and num.tolist() == [8]


def test_align_all_to_one_expert_and_all_dropped():
    ids = torch.full((20, 1), 3, dtype=torch.int32, device=DEVICE)
    sorted_ids, expert_ids = check_align(ids, 5, 16)
    assert expert_ids.tolist() == [3, 3] and sorted_ids[:20].tolist() == list(range(20))
    sorted_ids, expert_ids, num = align_exact(torch.full((4, 2), -1, device=DEVICE), 5, 16)
    assert sorted_ids.numel() == 0 and expert_ids.numel() == 0 and num.tolist() == [0]


def test_align_padded_is_exact_plus_empty_tail():
    ids = random_ids(50, 32, 4, 0.2, torch.Generator(DEVICE).manual_seed(1))
    exact = align_exact(ids, 32, 16)
    padded = moe_align(ids, 32, 16)
    P = exact[0].numel()
    assert torch.equal(padded[0][:P], exact[0]) and (padded[0][P:] == ids.numel()).all()
    assert torch.equal(padded[1][: P // 16], exact[1]) and (padded[1][P // 16:] == -1).all()
    assert torch.equal(padded[2], exact[2])


def test_align_rejects_bad_arguments():
    with pytest.raises(ValueError, match="topk_ids"):
        align_exact(torch.zeros(4, dtype=torch.int64), 4, 16)
    with pytest.raises(ValueError, match="block_m"):
        align_exact(torch.zeros(4, 2, dtype=torch.int64), 4, 0)


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,D,I,E,K,drop", [(1, 16, 8, 4, 1, 0.0), (9, 24, 20, 6, 3, 0.3), (13, 32, 16, 8, 8, 0.0)])
def test_reference_vs_naive_loop(T, D, I, E, K, drop):
    args, _ = make_moe(T, D, I, E, K, torch.float32, drop=drop, device="cpu")
    out = fused_moe_reference(*args)
    assert_close_rel(out.double(), naive_moe(*args), 1e-5)


def test_reference_fp8_vs_naive_loop_on_dequantised():
    args, kw = make_moe(5, 136, 200, 3, 2, torch.float32, fp8=True, device="cpu")
    x, wg, wu, wd, w, ids = args
    deq = [fp8_weight_dequant(t, s) for t, s in zip((wg, wu, wd), kw.values())]
    assert_close_rel(fused_moe_reference(*args, **kw).double(), naive_moe(x, *deq, w, ids), 1e-5)


@pytest.mark.parametrize("T,D,I,E,K,drop", [(1, 16, 8, 4, 1, 0.0), (9, 24, 20, 6, 3, 0.3), (13, 32, 16, 8, 8, 0.0),
                                          (32, 64, 32, 17, 4, 0.5)])
def test_batched_vs_naive_loop(T, D, I, E, K, drop, monkeypatch):
    import epserve.kernels.fused_moe as mod
    monkeypatch.setattr(mod, "fused_moe_reference", None)     # the batched path itself, no fallback
    args, _ = make_moe(T, D, I, E, K, torch.float32, drop=drop, device="cpu")
    assert_close_rel(fused_moe_torch(*args).double(), naive_moe(*args), 1e-5)


@pytest.mark.parametrize("used", [6, 3])
def test_batched_with_most_or_few_experts_hit(used, monkeypatch):
    """6 of 8 experts hit: all 8 go through the bmm (2 with zero rows), no weight copied; 3 of 8: the hit ones'
    weights are gathered. Both against the naive loop."""
    import epserve.kernels.fused_moe as mod
    monkeypatch.setattr(mod, "fused_moe_reference", None)
    experts = torch.tensor([7, 1, 4, 2, 6, 5])[:used]                            # not in order, not from 0
    ids = torch.stack([experts[torch.arange(12) % used], experts[(torch.arange(12) + 1) % used]], dim=1)   # [12, 2]
    args, _ = make_moe(12, 32, 16, 8, 2, torch.float32, ids=ids, device="cpu")
    assert_close_rel(fused_moe_torch(*args).double(), naive_moe(*args), 1e-5)
    # bit for bit what the hit experts alone give (the gathered path's numerics: greedy parity rests on them)
    x, w_gate, w_up, w_down, weights, _ = args
    hit = experts.sort().values
    alone = fused_moe_torch(x, w_gate[hit], w_up[hit], w_down[hit], weights, torch.searchsorted(hit, ids))
    assert torch.equal(fused_moe_torch(*args), alone)


def test_batched_falls_back_beyond_its_copy_limit(monkeypatch):
    import epserve.kernels.fused_moe as mod
    args, _ = make_moe(8, 32, 16, 8, 2, torch.float32, device="cpu")
    args[5][:, :] = torch.tensor([0, 1])                       # 2 of 8 experts hit: their weights are copied
    monkeypatch.setattr(mod, "COPY_LIMIT_BYTES", 0)
    assert torch.equal(fused_moe_torch(*args), fused_moe_reference(*args))


def test_batched_fp8_vs_naive_loop_on_dequantised():
    args, kw = make_moe(5, 136, 200, 3, 2, torch.float32, fp8=True, device="cpu")
    x, wg, wu, wd, w, ids = args
    deq = [fp8_weight_dequant(t, s) for t, s in zip((wg, wu, wd), kw.values())]
    assert_close_rel(fused_moe_torch(*args, **kw).double(), naive_moe(x, *deq, w, ids), 1e-5)


def test_batched_bf16_matches_reference():
    args, _ = make_moe(24, 64, 32, 8, 4, torch.bfloat16, drop=0.2, device="cpu")
    assert_close_rel(fused_moe_torch(*args).float(), fused_moe_reference(*args).float(), 1e-2)


def test_batched_skewed_or_empty_routing():
    ids = torch.cat([torch.arange(7), torch.full((30,), 7)])[:, None]    # 8 experts x 30 padded rows, 37 kept
    args, _ = make_moe(37, 32, 32, 8, 1, torch.float32, ids=ids, device="cpu")
    assert torch.equal(fused_moe_torch(*args), fused_moe_reference(*args))     # beyond PAD_LIMIT: the reference
    args, _ = make_moe(3, 32, 32, 4, 2, torch.float32, ids=torch.full((3, 2), -1), device="cpu")
    assert torch.equal(fused_moe_torch(*args), torch.zeros(3, 32))


def test_reference_bf16_close_to_fp32():
    args, _ = make_moe(16, 64, 32, 8, 4, torch.float32, device="cpu")
    out32 = fused_moe_reference(*args)
    bf = [a.bfloat16() if a.is_floating_point() and i < 4 else a for i, a in enumerate(args)]
    assert_close_rel(fused_moe_reference(*bf).float(), out32, 2e-2)


# ---------------------------------------------------------------------------------------------
# Triton (interpreter on the CPU) vs reference
# ---------------------------------------------------------------------------------------------
CASES = {
    "one_token": dict(T=1, D=48, I=40, E=4, K=2),
    "all_to_one_expert": dict(T=21, D=32, I=32, E=4, K=1, ids=torch.full((21, 1), 2)),
    "some_experts_empty": dict(T=6, D=32, I=48, E=16, K=2),
    "T_not_multiple_of_block_m": dict(T=19, D=48, I=40, E=3, K=2),
    "odd_D_I": dict(T=8, D=48, I=40, E=4, K=2),
    "multiples_of_128": dict(T=8, D=256, I=128, E=3, K=2),
    "ids_with_minus_one": dict(T=12, D=32, I=24, E=4, K=3, drop=0.4),
    "K1": dict(T=10, D=32, I=32, E=4, K=1),
    "K8": dict(T=5, D=32, I=24, E=10, K=8),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_vs_reference(case, dtype):
    params = dict(CASES[case])
    args, _ = make_moe(params.pop("T"), params.pop("D"), params.pop("I"), params.pop("E"), params.pop("K"),
                       dtype, **params)
    assert_close_rel(fused_moe_triton(*args, config=SMALL), fused_moe_reference(*args), TOL[dtype])


def test_triton_all_choices_dropped_gives_zeros():
    args, _ = make_moe(4, 32, 32, 4, 2, torch.float32, ids=torch.full((4, 2), -1))
    assert torch.equal(fused_moe_triton(*args, config=SMALL), torch.zeros(4, 32, device=DEVICE))


@pytest.mark.parametrize("config", [
    dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=1),
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=1),
], ids=["bm32_bn16", "bn64_bk64"])
def test_triton_other_tiles(config):
    args, _ = make_moe(23, 80, 72, 5, 3, torch.float32, drop=0.1)
    assert_close_rel(fused_moe_triton(*args, config=config), fused_moe_reference(*args), 1e-4)


def test_triton_fp16():
    args, _ = make_moe(9, 48, 40, 4, 2, torch.float16)
    assert_close_rel(fused_moe_triton(*args, config=SMALL), fused_moe_reference(*args), TOL[torch.float16])


def test_v3_routing_shape_small_hidden():
    """256 experts, top-8, T=64 (tiny D/I to keep the interpreter fast); default tiles."""
    args, _ = make_moe(64, 32, 16, 256, 8, torch.bfloat16)
    assert_close_rel(fused_moe_triton(*args), fused_moe_reference(*args), TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(7, 136, 200, 3, 2), (4, 256, 128, 4, 3)], ids=["partial_blocks", "full_blocks"])
def test_triton_fp8_block_scaled(shape, dtype):
    T, D, I, E, K = shape
    args, kw = make_moe(T, D, I, E, K, dtype, fp8=True, drop=0.2)
    out = fused_moe_triton(*args, **kw, config=SMALL)
    assert_close_rel(out, fused_moe_reference(*args, **kw), TOL[dtype])
    x, wg, wu, wd, w, ids = args
    deq = [fp8_weight_dequant(t, s, dtype=dtype) for t, s in zip((wg, wu, wd), kw.values())]
    assert_close_rel(out, fused_moe_triton(x, *deq, w, ids, config=SMALL), TOL[dtype])


def test_fp8_rejects_tiles_straddling_scale_blocks():
    args, kw = make_moe(2, 32, 32, 2, 1, torch.float32, fp8=True)
    with pytest.raises(ValueError, match="BLOCK_K"):
        fused_moe_triton(*args, **kw, config=dict(SMALL, BLOCK_K=256))


# ---------------------------------------------------------------------------------------------
# Dispatch and validation
# ---------------------------------------------------------------------------------------------
def test_dispatch_follows_backend(monkeypatch):
    args, _ = make_moe(6, 32, 32, 4, 2, torch.float32)
    calls = []
    import epserve.kernels.fused_moe as mod
    monkeypatch.setattr(mod, "fused_moe_triton", lambda *a, **k: calls.append("triton") or mod.fused_moe_torch(*a, **k))
    try:
        backend.set_backend("torch")
        ref = fused_moe(*args)
        assert calls == []
        backend.set_backend("triton")
        assert torch.equal(fused_moe(*args), ref) and calls == ["triton"]
    finally:
        backend.set_backend(None)


@pytest.mark.parametrize("mutate,name", [
    (lambda a, kw: a.__setitem__(0, a[0][None]), "x"),
    (lambda a, kw: a.__setitem__(1, a[1][:, :, :-1]), "w_gate"),
    (lambda a, kw: a.__setitem__(2, a[2][:1]), "w_up"),
    (lambda a, kw: a.__setitem__(3, a[3].double()), "w_down"),
    (lambda a, kw: a.__setitem__(4, a[4].double()), "topk_weights"),
    (lambda a, kw: a.__setitem__(5, a[5].float()), "topk_ids"),
    pytest.param(lambda a, kw: a.__setitem__(5, a[5] + 100), "topk_ids", id="ids_out_of_range",
                 marks=pytest.mark.skipif(DEVICE == "cuda", reason="range check would sync: CPU only")),
    (lambda a, kw: kw.__setitem__("w_down_scale", torch.ones(1, 1, 1, device=DEVICE)), "w_down_scale"),
])
def test_validation_names_argument(mutate, name):
    args, kw = make_moe(4, 32, 32, 3, 2, torch.float32)
    args = list(args)
    mutate(args, kw)
    for fn in (fused_moe, fused_moe_torch, fused_moe_reference, fused_moe_triton):
        with pytest.raises(ValueError, match=name):
            fn(*args, **kw)


def test_validation_fp8_scales():
    args, kw = make_moe(4, 32, 32, 3, 2, torch.float32, fp8=True)
    with pytest.raises(ValueError, match="w_up_scale"):
        fused_moe(*args, **dict(kw, w_up_scale=None))
    with pytest.raises(ValueError, match="w_gate_scale"):
        fused_moe(*args, **dict(kw, w_gate_scale=kw["w_gate_scale"].double()))


# ---------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 512])
@pytest.mark.parametrize("mode", ["bf16", "fp8"])
def test_gpu_realistic_vs_reference(T, mode):
    args, kw = make_moe(T, 2048, 1024, 64, 8, torch.bfloat16, fp8=mode == "fp8", drop=0.1, device="cuda")
    out = fused_moe_triton(*args, **kw)
    assert_close_rel(out, fused_moe_reference(*args, **kw), TOL[torch.bfloat16])
    if mode == "bf16":
        args32 = [a.float() if a.is_floating_point() else a for a in args]
        assert_close_rel(fused_moe_triton(*args32).float(), fused_moe_reference(*args32), 1e-4)
