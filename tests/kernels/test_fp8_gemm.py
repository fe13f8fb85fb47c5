"""Block-scaled FP8 GEMM and fp8_linear: Triton vs torch reference vs a per-K-block loop."""
import pytest
import torch

from epserve.kernels import backend
from epserve.kernels.fp8 import FP8_BLOCK, fp8_dequant, fp8_quant_reference, fp8_weight_dequant, fp8_weight_quant
from epserve.kernels.fp8_gemm import GemmConfig, fp8_gemm, fp8_gemm_reference, fp8_gemm_triton, fp8_linear, pick_config

pytestmark = pytest.mark.unit

# (M, N, K): decode M=1, odd M=37, N/K not multiples of 128 (K=200, N=72), several K blocks
SHAPES = [(1, 72, 200), (37, 72, 200), (16, 256, 256), (37, 130, 384), (3, 128, 128)]
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
              torch.float16: dict(rtol=1e-3, atol=1e-3)}


def make_operands(M: int, N: int, K: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) * 0.05
    w[: min(N, FP8_BLOCK), : min(K, FP8_BLOCK)] *= 8  # blocks with different scales
    a_q, a_scale = fp8_quant_reference(x)
    w_q, w_scale = fp8_weight_quant(w)
    return x, w, a_q, a_scale, w_q, w_scale


def naive_block_gemm(a_q, a_scale, w_q, w_scale) -> torch.Tensor:
    """DeepGEMM's definition: per 128-wide K block, dot of the fp8 values, scaled, accumulated."""
    M, K = a_q.shape
    N = w_q.shape[0]
    out = torch.zeros(M, N, dtype=torch.float64)
    for kb in range(-(-K // FP8_BLOCK)):
        ks = slice(kb * FP8_BLOCK, (kb + 1) * FP8_BLOCK)
        dot = a_q[:, ks].double() @ w_q[:, ks].double().T                    # [M, N]
        w_s = w_scale[torch.arange(N) // FP8_BLOCK, kb].double()              # [N]
        out += dot * a_scale[:, kb].double()[:, None] * w_s[None, :]
    return out


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_reference_matches_naive(M, N, K):
    _, _, a_q, a_scale, w_q, w_scale = make_operands(M, N, K)
    out = fp8_gemm_reference(a_q, a_scale, w_q, w_scale, out_dtype=torch.float32)
    expected = naive_block_gemm(a_q, a_scale, w_q, w_scale).float()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_triton_matches_reference(M, N, K, out_dtype):
    _, _, a_q, a_scale, w_q, w_scale = make_operands(M, N, K, seed=1)
    out = fp8_gemm_triton(a_q, a_scale, w_q, w_scale, out_dtype=out_dtype)
    ref = fp8_gemm_reference(a_q, a_scale, w_q, w_scale, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (M, N)
    torch.testing.assert_close(out, ref, **TOLERANCES[out_dtype])


@pytest.mark.parametrize("config", [GemmConfig(16, 32, split_k=2), GemmConfig(32, 64, split_k=3, group_m=2),
                                    GemmConfig(16, 16, group_m=1)])
def test_triton_tile_configs(config):
    """Split-K partial sums, grouped tile order and tiles narrower than a scale block."""
    _, _, a_q, a_scale, w_q, w_scale = make_operands(37, 200, 400, seed=2)
    out = fp8_gemm_triton(a_q, a_scale, w_q, w_scale, out_dtype=torch.float32, config=config)
    ref = fp8_gemm_reference(a_q, a_scale, w_q, w_scale, out_dtype=torch.float32)
    torch.testing.assert_close(out, ref, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("impl", [fp8_gemm_triton, fp8_gemm_reference])
@pytest.mark.parametrize("M,N,K", [(1, 72, 200), (37, 130, 384)])
def test_close_to_float_matmul(impl, M, N, K):
    """Against the unquantised product: only e4m3 rounding (~2**-4 relative per element) remains."""
    x, w, a_q, a_scale, w_q, w_scale = make_operands(M, N, K, seed=3)
    out = impl(a_q, a_scale, w_q, w_scale, out_dtype=torch.float32)
    exact = x @ w.T
    assert (out - exact).norm() / exact.norm() < 0.05
    dequantised = fp8_dequant(a_q, a_scale) @ fp8_weight_dequant(w_q, w_scale).T
    torch.testing.assert_close(out, dequantised, rtol=1e-5, atol=1e-4)


def test_pick_config_splits_k_only_for_small_grids():
    assert pick_config(1, 7168, 2048, num_sms=132).split_k == 1
    assert pick_config(1, 2112, 7168, num_sms=132).split_k > 1
    assert pick_config(4096, 7168, 2048, num_sms=132).split_k == 1
    assert pick_config(1, 72, 200, num_sms=1).split_k == 1


@pytest.mark.parametrize("name", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear(name, dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 200, generator=g).to(dtype)  # [..., K]
    w = torch.randn(72, 200, generator=g) * 0.05
    w_q, w_scale = fp8_weight_quant(w)
    try:
        backend.set_backend(name)
        y = fp8_linear(x, w_q, w_scale)
    finally:
        backend.set_backend(None)
    assert y.shape == (2, 3, 72) and y.dtype == dtype
    exact = x.float() @ fp8_weight_dequant(w_q, w_scale).T
    assert (y.float() - exact).norm() / exact.norm() < 0.05


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_dispatch_and_empty(name):
    _, _, a_q, a_scale, w_q, w_scale = make_operands(0, 72, 200)
    try:
        backend.set_backend(name)
        out = fp8_gemm(a_q, a_scale, w_q, w_scale)
    finally:
        backend.set_backend(None)
    assert out.shape == (0, 72) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("impl", [fp8_gemm_triton, fp8_gemm_reference])
def test_rejects_bad_inputs(impl):
    _, _, a_q, a_scale, w_q, w_scale = make_operands(4, 72, 200)
    with pytest.raises(ValueError, match="a_q"):
        impl(a_q.float(), a_scale, w_q, w_scale)
    with pytest.raises(ValueError, match="a_scale"):
        impl(a_q, a_scale[:, :1], w_q, w_scale)
    with pytest.raises(ValueError, match="w_q"):
        impl(a_q, a_scale, w_q[:, :100], w_scale)
    with pytest.raises(ValueError, match="w_scale"):
        impl(a_q, a_scale, w_q, w_scale.double())
    with pytest.raises(ValueError, match="out_dtype"):
        impl(a_q, a_scale, w_q, w_scale, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="K"):
        fp8_linear(torch.randn(2, 100), w_q, w_scale)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 64, 4096])
@pytest.mark.parametrize("N,K", [(7168, 2048), (2112, 7168), (72, 200)])
def test_triton_cuda_realistic(M, N, K):
    """Hopper's fp8 wgmma adds inside one 128-wide K block with ~14-bit precision (as in DeepGEMM,
    the fp32 promotion happens per block), so compare against the output's scale, not elementwise."""
    x = torch.randn(M, K, device="cuda").bfloat16()
    w = torch.randn(N, K, device="cuda") * 0.05
    a_q, a_scale = fp8_quant_reference(x)
    w_q, w_scale = fp8_weight_quant(w)
    out = fp8_gemm_triton(a_q, a_scale, w_q, w_scale, out_dtype=torch.float32)
    ref = fp8_gemm_reference(a_q, a_scale, w_q, w_scale, out_dtype=torch.float32)
    assert (out - ref).abs().max() <= 1e-3 * ref.abs().max()
    y = fp8_linear(x, w_q, w_scale)
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max() <= 1e-2 * ref.abs().max()
