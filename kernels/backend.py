"""The one switch between each kernel's Triton path and its torch path, and what every kernel shares.

``EPSERVE_KERNELS=auto`` (default) runs Triton on CUDA tensors and torch on CPU tensors;
``triton`` forces Triton (on the CPU that needs ``TRITON_INTERPRET=1``); ``torch`` forces the
torch paths everywhere. ``set_backend`` overrides the environment for the current process.
"""
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # activation dtypes the kernels take

_CHOICES = ("auto", "triton", "torch")
_override: str | None = None


def set_backend(name: str | None) -> None:
    """Force ``"triton"`` or ``"torch"`` for this process; ``None`` or ``"auto"`` restores auto."""
    global _override
    if name is not None and name not in _CHOICES:
        raise ValueError(f"kernel backend must be one of {_CHOICES}, got {name!r}")
    _override = name


def backend() -> str:
    name = _override or os.environ.get("EPSERVE_KERNELS", "auto")
    if name not in _CHOICES:
        raise ValueError(f"EPSERVE_KERNELS must be one of {_CHOICES}, got {name!r}")
    return name


def use_triton(x: torch.Tensor) -> bool:
    """Whether the op on tensor ``x`` should run its Triton kernel."""
    name = backend()
    if name == "auto":
        return x.is_cuda
    return name == "triton"


def interpreting(x: torch.Tensor) -> bool:
    """Whether Triton kernels on ``x`` run in the interpreter (``TRITON_INTERPRET=1`` or a CPU tensor)."""
    return os.environ.get("TRITON_INTERPRET") == "1" or not x.is_cuda
