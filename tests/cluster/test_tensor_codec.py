"""Tensor codec: exact round trips for every wire dtype, and errors naming the dtype or size."""
import pytest
import torch

from epserve.kernels.fp8 import FP8_DTYPE, FP8_MAX
from epserve.services.cluster.tensor_codec import DTYPES, from_proto, to_proto
from epserve.services.proto import tensor_pb2

pytestmark = pytest.mark.unit


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    return torch.randint(-(1 << 30), 1 << 30, shape, generator=g).to(dtype)


@pytest.mark.parametrize("name", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 2), (1,), (), (0, 64)], ids=str)
def test_round_trip_is_exact(name, shape):
    t = _sample(DTYPES[name], shape)
    msg = to_proto(t)
    assert msg.dtype == name and list(msg.shape) == list(shape)
    assert len(msg.data) == t.numel() * t.element_size()
    back = from_proto(tensor_pb2.Tensor.FromString(msg.SerializeToString()))
    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(back.view(torch.uint8) if back.dim() else back.reshape(1).view(torch.uint8),
                       t.view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8))


def test_non_contiguous_input_and_fp8_special_values():
    t = _sample(torch.float32, (8, 6)).t()                          # a transposed view
    assert torch.equal(from_proto(to_proto(t)), t)
    special = torch.tensor([0.0, -0.0, FP8_MAX, -FP8_MAX, 2 ** -9, float("nan")]).to(FP8_DTYPE)
    back = from_proto(to_proto(special))
    assert torch.equal(back.view(torch.uint8), special.view(torch.uint8))


def test_bf16_is_two_bytes_per_element_little_endian():
    msg = to_proto(torch.tensor([1.0], dtype=torch.bfloat16))
    assert msg.data == bytes([0x80, 0x3F])                           # 0x3F80


@pytest.mark.parametrize("dtype", [torch.complex64, torch.bool, torch.uint8, torch.float64])
def test_unsupported_dtype_is_named(dtype):
    with pytest.raises(ValueError, match=str(dtype)):
        to_proto(torch.zeros(2, dtype=dtype))


def test_unknown_dtype_name_is_named():
    with pytest.raises(ValueError, match="'complex128'"):
        from_proto(tensor_pb2.Tensor(data=b"", dtype="complex128", shape=[0]))


@pytest.mark.parametrize("nbytes", [0, 15, 17])
def test_data_size_must_match_shape(nbytes):
    with pytest.raises(ValueError, match=r"float32 tensor of shape \[2, 2\] needs 16 bytes"):
        from_proto(tensor_pb2.Tensor(data=bytes(nbytes), dtype="float32", shape=[2, 2]))


def test_negative_dimension_is_rejected():
    with pytest.raises(ValueError, match="negative"):
        from_proto(tensor_pb2.Tensor(data=b"", dtype="int32", shape=[-1, 0]))
