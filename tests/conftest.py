"""Test-session setup shared by every test.

Without CUDA, Triton kernels run in the interpreter (``TRITON_INTERPRET=1``), which must be set
before ``triton`` is first imported; ``gpu`` tests are skipped.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
