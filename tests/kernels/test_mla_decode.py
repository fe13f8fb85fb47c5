"""MLA decode over a paged latent KV cache: Triton (interpreter on the CPU) vs the torch
reference, and the reference vs a naive per-sequence, per-head loop."""
import pytest
import torch

from epserve.kernels import backend
from epserve.kernels.mla_decode import mla_decode, mla_decode_reference, mla_decode_triton

pytestmark = pytest.mark.unit

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton runs interpreted on the CPU
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def make_case(seq_lens, heads=4, latent=32, rope=16, block_size=16, dtype=torch.float32,
              spare_blocks=5, unused=-1, device=DEVICE, seed=0):
    """Inputs with every sequence's pages drawn at random from a larger pool (scattered,
    out of order) and unused block-table entries set to ``unused``."""
    gen = torch.Generator().manual_seed(seed)
    pages = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(pages) + spare_blocks
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    block_table = torch.full((len(seq_lens), max(pages) + 1), unused, dtype=torch.int32)
    for b, n in enumerate(pages):
        block_table[b, :n] = torch.tensor(pool[:n], dtype=torch.int32)
        pool = pool[n:]
    kv_cache = torch.randn(num_blocks, block_size, latent + rope, generator=gen)
    q_latent = torch.randn(len(seq_lens), heads, latent, generator=gen)
    q_rope = torch.randn(len(seq_lens), heads, rope, generator=gen)
    scale = (latent + rope) ** -0.5
    return (q_latent.to(device, dtype), q_rope.to(device, dtype), kv_cache.to(device, dtype),
            block_table.to(device), torch.tensor(seq_lens, dtype=torch.int32, device=device),
            scale)


def naive_mla_decode(q_latent, q_rope, kv_cache, block_table, seq_lens, softmax_scale):
    """Obviously-correct loop: gather each sequence's rows one by one, plain softmax per head."""
    latent = q_latent.shape[2]
    block_size = kv_cache.shape[1]
    out = torch.empty(q_latent.shape, dtype=torch.float32, device=q_latent.device)
    for b in range(q_latent.shape[0]):
        rows = torch.stack([kv_cache[block_table[b, j // block_size], j % block_size].float()
                            for j in range(int(seq_lens[b]))])  # [T, L + R]
        for h in range(q_latent.shape[1]):
            scores = (rows[:, :latent] @ q_latent[b, h].float()
                      + rows[:, latent:] @ q_rope[b, h].float()) * softmax_scale
            probs = torch.exp(scores - scores.max())
            out[b, h] = (probs / probs.sum()) @ rows[:, :latent]
    return out.to(q_latent.dtype)


def assert_close(actual, expected, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


def check_triton(case, dtype=torch.float32, num_splits=None):
    expected = mla_decode_reference(*case)
    actual = mla_decode_triton(*case, num_splits=num_splits)
    assert actual.shape == expected.shape and actual.dtype == dtype
    assert_close(actual, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq_lens,heads,latent,rope,block_size", [
    ([1], 1, 32, 16, 16),
    ([5, 33, 16], 3, 40, 8, 16),
    ([70, 2], 2, 24, 8, 8),
])
def test_reference_matches_naive_loop(dtype, seq_lens, heads, latent, rope, block_size):
    case = make_case(seq_lens, heads, latent, rope, block_size, dtype)
    expected = naive_mla_decode(*case)
    assert_close(mla_decode_reference(*case), expected, dtype)


def test_one_sequence_one_token():
    case = make_case([1], heads=3)
    out = mla_decode_triton(*case)
    row = case[2][case[3][0, 0], 0, :32]  # the only key: softmax weight 1, output = its latent
    assert_close(out[0], row.expand(3, -1), torch.float32)
    check_triton(case)


def test_block_size_not_dividing_seq_len():
    check_triton(make_case([45, 23], block_size=16))


def test_very_different_lengths():
    check_triton(make_case([1, 17, 200], heads=5))


def test_shuffled_block_table_with_garbage_unused_entries():
    case = list(make_case([30, 64, 9], block_size=8, spare_blocks=20, unused=1 << 30))
    assert not torch.equal(case[3][0, :4], case[3][0, :4].sort().values)  # really shuffled
    check_triton(tuple(case))


@pytest.mark.parametrize("heads", [1, 5, 16, 40])
def test_head_counts(heads):
    check_triton(make_case([20, 50], heads=heads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_heads_large_batch(dtype):
    """Enough (sequence, 64-head block) pairs for the 64-head tiling; 80 heads is ragged."""
    check_triton(make_case([3, 70, 1, 129] * 4, heads=80, block_size=32, dtype=dtype), dtype)


@pytest.mark.parametrize("block_size", [64, 128])
def test_page_aligned_tiles(block_size):
    """block_size a multiple of BLOCK_N: one block-table read per tile."""
    check_triton(make_case([1, 100, 300], block_size=block_size, dtype=torch.bfloat16),
                 torch.bfloat16)


@pytest.mark.parametrize("latent,rope", [(32, 16), (40, 8), (64, 32)])
def test_small_and_odd_latent_rope(latent, rope):
    check_triton(make_case([19, 40], latent=latent, rope=rope))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    check_triton(make_case([1, 17, 90], heads=5, dtype=dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_num_splits_agree(dtype):
    case = make_case([1, 17, 130], heads=3, dtype=dtype)
    one = mla_decode_triton(*case, num_splits=1)
    for num_splits in (2, 5, 16):  # 16 leaves most splits of the short sequences empty
        assert_close(mla_decode_triton(*case, num_splits=num_splits), one, dtype)
    check_triton(case, dtype, num_splits=5)


def test_non_contiguous_query():
    q_latent, q_rope, *rest = make_case([25, 7], heads=4)
    q_latent_t = q_latent.transpose(0, 1).contiguous().transpose(0, 1)  # [B, H, L], H outer
    assert not q_latent_t.is_contiguous()
    check_triton((q_latent_t, q_rope, *rest))


def test_dispatch_follows_backend():
    case = make_case([12, 3])
    expected = mla_decode_reference(*case)
    try:
        for name in ("torch", "triton"):
            backend.set_backend(name)
            assert_close(mla_decode(*case, num_splits=2), expected, torch.float32)
    finally:
        backend.set_backend(None)


@pytest.mark.parametrize("arg,bad,match", [
    (0, lambda t: t.to(torch.float64), "q_latent"),
    (1, lambda t: t[:, :2], "q_rope"),
    (2, lambda t: t.to(torch.float16), "kv_cache"),
    (2, lambda t: t[..., :-1], "kv_cache"),
    (3, lambda t: t.long(), "block_table"),
    (4, lambda t: t[:1], "seq_lens"),
    (4, lambda t: t + 1000, "seq_lens"),
    (4, lambda t: t * 0, "seq_lens"),
])
def test_bad_inputs_raise(arg, bad, match):
    case = list(make_case([10, 4], device="cpu"))  # seq_lens values are checked on the CPU only
    case[arg] = bad(case[arg])
    with pytest.raises(ValueError, match=match):
        mla_decode(*case)
    with pytest.raises(ValueError, match=match):
        mla_decode_triton(*case)


def test_bad_num_splits_raises():
    with pytest.raises(ValueError, match="num_splits"):
        mla_decode_triton(*make_case([3], device="cpu"), num_splits=0)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [16, 128])
def test_gpu_v3_shapes(heads):
    lens = torch.randint(1, 4097, (32,), generator=torch.Generator().manual_seed(1)).tolist()
    case = make_case(lens, heads=heads, latent=512, rope=64, block_size=64,
                     dtype=torch.bfloat16, device="cuda")
    expected = mla_decode_reference(*case)
    for num_splits in (None, 1, 7):
        assert_close(mla_decode(*case, num_splits=num_splits), expected, torch.bfloat16)
    fp32_case = make_case(lens[:4], heads=heads, latent=512, rope=64, block_size=64,
                          device="cuda")
    assert_close(mla_decode(*fp32_case), mla_decode_reference(*fp32_case), torch.float32)
