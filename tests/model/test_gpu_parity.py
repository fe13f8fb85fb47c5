"""On CUDA the model runs the Triton kernels; it must still match transformers token for token."""
import pytest
import torch

from epserve.services.engine.engine import EngineConfig, LLMEngine
from epserve.services.engine.params import SamplingParams
from tests.hf_models import PARITY_PROMPTS, TINY_CONFIGS, hf_greedy

pytestmark = pytest.mark.gpu

PROMPTS = PARITY_PROMPTS


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_triton_path_matches_transformers_float32(hf_checkpoints, name):
    path = hf_checkpoints[name]
    engine = LLMEngine.from_path(path, EngineConfig(block_size=16, num_kv_blocks=64), dtype=torch.float32, device="cuda")
    seqs = engine.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    for prompt, seq in zip(PROMPTS, seqs):
        assert seq.output_ids == hf_greedy(path, prompt, 32)[0]


def test_bfloat16_engine_runs_and_frees_blocks(hf_checkpoints):
    engine = LLMEngine.from_path(hf_checkpoints["v3_shape"], EngineConfig(block_size=16, num_kv_blocks=64),
                                 dtype=torch.bfloat16, device="cuda")
    seqs = engine.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0.8, seed=1, ignore_eos=True))
    assert all(len(s.output_ids) == 16 for s in seqs) and engine.blocks.num_used == 0
