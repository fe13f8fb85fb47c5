"""Per-token-group FP8 quantisation: Triton kernel vs torch reference vs a loop-based definition."""
import pytest
import torch

from epserve.kernels import backend
from epserve.kernels.fp8_quant import (
    FP8_DTYPE, FP8_MAX, SCALE_FLOOR, dequant_fp8, fp8_quant, per_token_group_quant_fp8,
    per_token_group_quant_fp8_reference,
)

pytestmark = pytest.mark.unit

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (M, K, group_size): full groups, a partial last group, a K smaller than one group, small groups
SHAPES = [(1, 128, 128), (5, 300, 128), (4, 1024, 128), (3, 77, 128), (2, 100, 32)]


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
    x_q, scale = per_token_group_quant_fp8_reference(x, group_size)
    n_q, n_scale = _naive_quant(x, group_size)
    assert x_q.dtype == FP8_DTYPE and x_q.shape == (M, K)
    assert scale.dtype == torch.float32 and scale.shape == (M, -(-K // group_size))
    torch.testing.assert_close(scale, n_scale, rtol=0, atol=0)
    assert torch.equal(x_q.view(torch.uint8), n_q.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,group_size", SHAPES)
def test_triton_matches_reference(M, K, group_size, dtype):
    x = _inputs(M, K, dtype, seed=1)
    x_q, scale = per_token_group_quant_fp8(x, group_size)
    r_q, r_scale = per_token_group_quant_fp8_reference(x, group_size)
    torch.testing.assert_close(scale, r_scale, rtol=1e-6, atol=0)
    assert _ulp_distance(x_q, r_q).max() <= 1


def test_rounding_on_every_e4m3_interval():
    """Dense sweep of [-448, 448] with scale 1: round-to-nearest-even, carries, subnormals, -0."""
    x = torch.cat([torch.linspace(-448, 448, 40001), torch.linspace(-0.03, 0.03, 20001),
                   torch.tensor([0.0, -0.0, 2 ** -10, -3 * 2 ** -11, 125.9, 447.9])]).view(1, -1)
    x_q, scale = per_token_group_quant_fp8(x, x.shape[1])
    r_q, r_scale = per_token_group_quant_fp8_reference(x, x.shape[1])
    assert scale.item() == r_scale.item() == 1.0
    assert _ulp_distance(x_q, r_q).max() <= 1
    assert torch.equal(r_q.float(), x.to(FP8_DTYPE).float())  # torch's own cast, scale 1


@pytest.mark.parametrize("impl", [per_token_group_quant_fp8, per_token_group_quant_fp8_reference])
def test_all_zero_rows(impl):
    x = torch.randn(3, 300)
    x[1] = 0
    x[2, 128:256] = 0  # one all-zero group in a non-zero row
    x_q, scale = impl(x, 128)
    assert torch.all(x_q[1].float() == 0)
    assert torch.all(x_q[2, 128:256].float() == 0)
    assert torch.all(scale[1] == SCALE_FLOOR / FP8_MAX) and scale[2, 1] == SCALE_FLOOR / FP8_MAX
    assert torch.isfinite(dequant_fp8(x_q, scale)).all()


@pytest.mark.parametrize("impl", [per_token_group_quant_fp8, per_token_group_quant_fp8_reference])
def test_partial_last_group_scale(impl):
    x = torch.randn(2, 300)
    x[:, 256:] *= 100  # the 44-wide last group has its own, larger scale
    _, scale = impl(x, 128)
    expected = x[:, 256:].abs().amax(dim=1) / FP8_MAX
    torch.testing.assert_close(scale[:, 2], expected, rtol=1e-6, atol=0)
    assert torch.all(scale[:, 2] > 10 * scale[:, 1])


@pytest.mark.parametrize("impl", [per_token_group_quant_fp8, per_token_group_quant_fp8_reference])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_error_bound(impl, dtype):
    """e4m3 keeps 3 mantissa bits: relative error <= 2**-4, plus half a subnormal step (2**-10 * scale)."""
    x = _inputs(6, 300, dtype, seed=2)
    x_q, scale = impl(x, 128)
    full_scale = scale.repeat_interleave(128, dim=1)[:, :300]
    err = (dequant_fp8(x_q, scale) - x.float()).abs()
    bound = x.float().abs() * 2 ** -4 + full_scale * 2 ** -10
    assert torch.all(err <= bound * (1 + 1e-6))
    assert x_q.float().abs().amax(dim=1).eq(FP8_MAX).all()  # each row's amax maps to 448


@pytest.mark.parametrize("columns", [slice(100, 400), slice(0, 512, 2)])
def test_strided_input(columns):
    x = torch.randn(4, 512)[:, columns]  # row stride 512; then also column stride 2
    x_q, scale = per_token_group_quant_fp8(x, 128)
    r_q, r_scale = per_token_group_quant_fp8_reference(x, 128)
    assert torch.equal(scale, r_scale) and _ulp_distance(x_q, r_q).max() <= 1


@pytest.mark.parametrize("impl", [per_token_group_quant_fp8, per_token_group_quant_fp8_reference])
def test_empty_input(impl):
    x_q, scale = impl(torch.randn(0, 256), 128)
    assert x_q.shape == (0, 256) and scale.shape == (0, 2)


@pytest.mark.parametrize("impl", [per_token_group_quant_fp8, per_token_group_quant_fp8_reference])
def test_rejects_bad_inputs(impl):
    with pytest.raises(ValueError, match="x"):
        impl(torch.randn(128), 128)
    with pytest.raises(ValueError, match="x"):
        impl(torch.randint(0, 5, (2, 128)), 128)
    with pytest.raises(ValueError, match="group_size"):
        impl(torch.randn(2, 128), 0)


def test_dispatch_follows_backend():
    x = _inputs(2, 256, torch.bfloat16)
    r_q, r_scale = per_token_group_quant_fp8_reference(x)
    try:
        for name in ("torch", "triton"):
            backend.set_backend(name)
            x_q, scale = fp8_quant(x)
            assert _ulp_distance(x_q, r_q).max() <= 1 and torch.equal(scale, r_scale)
    finally:
        backend.set_backend(None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_cuda_realistic(dtype):
    x = (torch.randn(4096, 7168, device="cuda") * 2).to(dtype)
    x[7] = 0
    x_q, scale = per_token_group_quant_fp8(x, 128)
    r_q, r_scale = per_token_group_quant_fp8_reference(x, 128)
    torch.testing.assert_close(scale, r_scale, rtol=1e-6, atol=0)
    assert _ulp_distance(x_q, r_q).max() <= 1
    assert (_ulp_distance(x_q, r_q) > 0).float().mean() < 1e-3
