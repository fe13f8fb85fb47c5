"""Tensors on internal wires: ``torch.Tensor`` <-> ``epserve.v1.Tensor`` (raw bytes + dtype + shape).

Every dtype travels as its raw little-endian bytes; bfloat16 and float8_e4m3fn (which numpy lacks)
go through a ``uint8`` view. Encoding copies once (into the message's ``bytes``); decoding is
zero-copy over the message's bytes object, so a decoded tensor is read-only by contract: clone it
before writing to it.
"""
from __future__ import annotations

import sys
import warnings

import torch

from epserve.services.proto import tensor_pb2

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "int32": torch.int32,
    "int64": torch.int64,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}

assert sys.byteorder == "little", "the wire format is little-endian"
# Decoded tensors alias immutable ``bytes``, which torch warns about once per process (a C++
# warn-once). They are read-only by contract (see the module docstring): spend that one warning here.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.frombuffer(b"\0", dtype=torch.uint8)


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of ``dtype``; ValueError naming it when it is not carried."""
    if dtype not in _NAMES:
        raise ValueError(f"tensor dtype {dtype} is not supported on the wire (supported: {', '.join(DTYPES)})")
    return _NAMES[dtype]


def to_proto(t: torch.Tensor) -> tensor_pb2.Tensor:
    """Any-layout tensor on any device -> message (one copy into ``bytes``; device tensors move to CPU)."""
    name = dtype_name(t.dtype)
    flat = t.detach().to("cpu").contiguous().reshape(-1)          # reshape: a 0-dim tensor can't .view()
    data = flat.view(torch.uint8).numpy().tobytes()
    return tensor_pb2.Tensor(data=data, dtype=name, shape=list(t.shape))


def from_proto(msg: tensor_pb2.Tensor) -> torch.Tensor:
    """Message -> CPU tensor sharing the message's bytes (read-only by contract).

    ValueError naming the dtype for an unknown dtype, or when the data size does not match the shape.
    """
    if msg.dtype not in DTYPES:
        raise ValueError(f"tensor dtype {msg.dtype!r} is not supported on the wire (supported: {', '.join(DTYPES)})")
    dtype = DTYPES[msg.dtype]
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"tensor shape {list(shape)} has a negative dimension")
    numel = 1
    for d in shape:
        numel *= d
    data = msg.data
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) != numel * itemsize:
        raise ValueError(f"{msg.dtype} tensor of shape {list(shape)} needs {numel * itemsize} bytes, "
                         f"got {len(data)}")
    if numel == 0:                                                  # frombuffer rejects empty buffers
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=torch.uint8).view(dtype).view(shape)
