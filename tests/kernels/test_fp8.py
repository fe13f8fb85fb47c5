"""The FP8 block format: activation quantisation (Triton kernel vs torch reference vs a loop-based
definition), weight quantisation and dequantisation."""
import pytest
import torch

from epserve.kernels import backend
from epserve.kernels.fp8 import (
    FP8_BLOCK, FP8_DTYPE, FP8_MAX, SCALE_FLOOR, fp8_dequant, fp8_quant, fp8_quant_reference, fp8_quant_triton,
    fp8_weight_dequant, fp8_weight_quant,
)

pytestmark = pytest.mark.unit

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (M, K, group_size): full groups, a partial last group, a K smaller than one group, small groups
SHAPES = [(1, 128, FP8_BLOCK), (5, 300, FP8_BLOCK), (4, 1024, FP8_BLOCK), (3, 77, FP8_BLOCK), (2, 100, 32)]


def _naive_quant(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, one group at a time."""
    M, K = x.shape
    n_groups = -(-K // group_size)
    x_q = torch.empty((M, K), dtype=FP8_DTYPE)
    scale = torch.empty((M, n_groups), dtype=torch.float32)
    for m in range(M):
        for g in range(n_groups):
            chunk = x[m, g * group_size:(g + 1) * group_size].float()
            s = max(chunk.abs().max().item(), SCALE_FLOOR) / FP8_MAX
            scale[m, g] = s
            x_q[m, g * group_size:(g + 1) * group_size] = (chunk / torch.tensor(s)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x_q, scale


def _ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many e4m3 steps apart two fp8 tensors are (+0 and -0 are the same value)."""
    def ordered(q):
        bits = q.view(torch.uint8).to(torch.int32)
        magnitude = bits & 0x7F
        return torch.where(bits & 0x80 != 0, -magnitude, magnitude)
    return (ordered(a) - ordered(b)).abs()


def _inputs(M: int, K: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 3
    x[:, ::7] *= 1e-4  # values that land in the e4m3 subnormal range
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,group_size", SHAPES)
def test_reference_matches_naive(M, K, group_size, dtype):
    x = _inputs(M, K, dtype)
    x_q, scale = fp8_quant_reference(x, group_size)
    n_q, n_scale = _naive_quant(x, group_size)
    assert x_q.dtype == FP8_DTYPE and x_q.shape == (M, K)
    assert scale.dtype == torch.float32 and scale.shape == (M, -(-K // group_size))
    torch.testing.assert_close(scale, n_scale, rtol=0, atol=0)
    assert torch.equal(x_q.view(torch.uint8), n_q.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,group_size", SHAPES)
def test_triton_matches_reference(M, K, group_size, dtype):
    x = _inputs(M, K, dtype, seed=1)
    x_q, scale = fp8_quant_triton(x, group_size)
    r_q, r_scale = fp8_quant_reference(x, group_size)
    torch.testing.assert_close(scale, r_scale, rtol=1e-6, atol=0)
    assert _ulp_distance(x_q, r_q).max() <= 1


def test_rounding_on_every_e4m3_interval():
    """Dense sweep of [-448, 448] with scale 1: round-to-nearest-even, carries, subnormals, -0."""
    x = torch.cat([torch.linspace(-448, 448, 40001), torch.linspace(-0.03, 0.03, 20001),
                   torch.tensor([0.0, -0.0, 2 ** -10, -3 * 2 ** -11, 125.9, 447.9])]).view(1, -1)
    x_q, scale = fp8_quant_triton(x, x.shape[1])
    r_q, r_scale = fp8_quant_reference(x, x.shape[1])
    assert scale.item() == r_scale.item() == 1.0
    assert _ulp_distance(x_q, r_q).max() <= 1
    assert torch.equal(r_q.float(), x.to(FP8_DTYPE).float())  # torch's own cast, scale 1


@pytest.mark.parametrize("impl", [fp8_quant_triton, fp8_quant_reference])
def test_all_zero_rows(impl):
    x = torch.randn(3, 300)
    x[1] = 0
    x[2, FP8_BLOCK:2 * FP8_BLOCK] = 0  # one all-zero group in a non-zero row
    x_q, scale = impl(x, FP8_BLOCK)
    assert torch.all(x_q[1].float() == 0)
    assert torch.all(x_q[2, FP8_BLOCK:2 * FP8_BLOCK].float() == 0)
    assert torch.all(scale[1] == SCALE_FLOOR / FP8_MAX) and scale[2, 1] == SCALE_FLOOR / FP8_MAX
    assert torch.isfinite(fp8_dequant(x_q, scale)).all()


@pytest.mark.parametrize("impl", [fp8_quant_triton, fp8_quant_reference])
def test_partial_last_group_scale(impl):
    x = torch.randn(2, 300)
    x[:, 256:] *= 100  # the 44-wide last group has its own, larger scale
    _, scale = impl(x, FP8_BLOCK)
    expected = x[:, 256:].abs().amax(dim=1) / FP8_MAX
    torch.testing.assert_close(scale[:, 2], expected, rtol=1e-6, atol=0)
    assert torch.all(scale[:, 2] > 10 * scale[:, 1])


@pytest.mark.parametrize("impl", [fp8_quant_triton, fp8_quant_reference])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_error_bound(impl, dtype):
    """e4m3 keeps 3 mantissa bits: relative error <= 2**-4, plus half a subnormal step (2**-10 * scale)."""
    x = _inputs(6, 300, dtype, seed=2)
    x_q, scale = impl(x, FP8_BLOCK)
    full_scale = scale.repeat_interleave(FP8_BLOCK, dim=1)[:, :300]
    err = (fp8_dequant(x_q, scale) - x.float()).abs()
    bound = x.float().abs() * 2 ** -4 + full_scale * 2 ** -10
    assert torch.all(err <= bound * (1 + 1e-6))
    assert x_q.float().abs().amax(dim=1).eq(FP8_MAX).all()  # each row's amax maps to 448


@pytest.mark.parametrize("columns", [slice(100, 400), slice(0, 512, 2)])
def test_strided_input(columns):
    x = torch.randn(4, 512)[:, columns]  # row stride 512; then also column stride 2
    x_q, scale = fp8_quant_triton(x, FP8_BLOCK)
    r_q, r_scale = fp8_quant_reference(x, FP8_BLOCK)
    assert torch.equal(scale, r_scale) and _ulp_distance(x_q, r_q).max() <= 1


@pytest.mark.parametrize("impl", [fp8_quant_triton, fp8_quant_reference])
def test_empty_input(impl):
    x_q, scale = impl(torch.randn(0, 256), FP8_BLOCK)
    assert x_q.shape == (0, 256) and scale.shape == (0, 2)


@pytest.mark.parametrize("impl", [fp8_quant_triton, fp8_quant_reference])
def test_rejects_bad_inputs(impl):
    with pytest.raises(ValueError, match="x"):
        impl(torch.randn(128), FP8_BLOCK)
    with pytest.raises(ValueError, match="x"):
        impl(torch.randint(0, 5, (2, 128)), FP8_BLOCK)
    with pytest.raises(ValueError, match="group_size"):
        impl(torch.randn(2, 128), 0)


def test_dispatch_follows_backend():
    x = _inputs(2, 256, torch.bfloat16)
    r_q, r_scale = fp8_quant_reference(x)
    try:
        for name in ("torch", "triton"):
            backend.set_backend(name)
            x_q, scale = fp8_quant(x)
            assert _ulp_distance(x_q, r_q).max() <= 1 and torch.equal(scale, r_scale)
    finally:
        backend.set_backend(None)



def test_weight_dequant_matches_loop():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 200, 136, generator=gen).to(FP8_DTYPE)
    s = torch.rand(2, 2, 2, generator=gen)
    out = fp8_weight_dequant(w, s)
    expected = torch.empty(2, 200, 136)
    for e in range(2):
        for r in range(200):
            for c in range(0, 136, 8):
                expected[e, r, c:c + 8] = w[e, r, c:c + 8].float() * s[e, r // FP8_BLOCK, c // FP8_BLOCK]
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="scale"):
        fp8_weight_dequant(w, s[:, :1])


def test_weight_quant_round_trip():
    weight = torch.randn(200, 300) * torch.linspace(0.01, 3, 300)
    q, scale_inv = fp8_weight_quant(weight)
    assert q.dtype == FP8_DTYPE and scale_inv.shape == (2, 3)
    restored = fp8_weight_dequant(q, scale_inv)
    # e4m3: 3 mantissa bits (relative error <= 2**-4), subnormal step 2**-9 in units of the block scale
    step = scale_inv.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:200, :300] * 2**-9
    assert ((restored - weight).abs() <= weight.abs() * 2**-4 + step).all()

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_cuda_realistic(dtype):
    x = (torch.randn(4096, 7168, device="cuda") * 2).to(dtype)
    x[7] = 0
    x_q, scale = fp8_quant_triton(x, FP8_BLOCK)
    r_q, r_scale = fp8_quant_reference(x, FP8_BLOCK)
    torch.testing.assert_close(scale, r_scale, rtol=1e-6, atol=0)
    assert _ulp_distance(x_q, r_q).max() <= 1
    assert (_ulp_distance(x_q, r_q) > 0).float().mean() < 1e-3
