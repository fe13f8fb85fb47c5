"""The model through the Triton kernels (interpreted on the CPU) still matches transformers."""
import pytest
import torch

from epserve.kernels import backend
from epserve.services.engine.engine import EngineConfig, LLMEngine
from epserve.services.engine.params import SamplingParams
from tests.hf_models import hf_greedy

pytestmark = pytest.mark.integration


def test_interpreted_triton_kernels_in_the_model_match_transformers(hf_checkpoints):
    path = hf_checkpoints["v3_shape"]
    prompts = [[5, 17, 42, 99, 3, 250, 7], [9, 8]]
    backend.set_backend("triton")
    try:
        engine = LLMEngine.from_path(path, EngineConfig(block_size=4, num_kv_blocks=32), dtype=torch.float32)
        seqs = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    finally:
        backend.set_backend(None)
    for prompt, seq in zip(prompts, seqs):
        assert seq.output_ids == hf_greedy(path, prompt, 6)[0]
