"""Triton kernels with their torch paths, one module per op.

Every op follows one naming rule:

- ``<op>``: the entry point. It dispatches on its input tensor (:func:`epserve.kernels.backend.use_triton`):
  the Triton path on CUDA, otherwise the torch path.
- ``<op>_triton``: the Triton host function (checks inputs, picks tiles, launches).
- ``<op>_reference``: the pure-torch reference, the definition the tests hold the others to.
- ``<op>_torch``: only where the CPU has a faster torch path than the reference (``fused_moe_torch``).
- ``_<op>_kernel``: the ``@triton.jit`` kernels (``_<op>_<stage>_kernel`` when an op has several).

Torch-only helpers (FP8 dequantisation, weight quantisation) are plain functions. The FP8 block format
(``FP8_BLOCK``, ``FP8_MAX``, ``FP8_DTYPE``) and its quantisers live in :mod:`epserve.kernels.fp8`.
"""
