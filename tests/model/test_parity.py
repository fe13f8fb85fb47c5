"""Token-for-token parity with transformers' DeepseekV3ForCausalLM on random tiny checkpoints."""
import json
import subprocess
import sys

import pytest
import torch

from epserve.services.engine.engine import EngineConfig, LLMEngine
from tests.hf_models import PARITY_PROMPTS, TINY_CONFIGS, greedy_with_logits, hf_greedy

pytestmark = pytest.mark.integration

NEW_TOKENS = 32
PROMPTS = PARITY_PROMPTS


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_greedy_tokens_and_logits_match_transformers(hf_checkpoints, name):
    path = hf_checkpoints[name]
    engine = LLMEngine.from_path(path, EngineConfig(block_size=4, num_kv_blocks=64), dtype=torch.float32)
    ours = greedy_with_logits(engine, PROMPTS, NEW_TOKENS)
    for prompt, (tokens, logits) in zip(PROMPTS, ours):
        ref_tokens, ref_logits = hf_greedy(path, prompt, NEW_TOKENS)
        assert tokens == ref_tokens, f"{name}: prompt of {len(prompt)} tokens diverged"
        assert logits.shape == ref_logits.shape
        assert (logits - ref_logits).abs().max().item() <= 1e-4
    assert engine.blocks.num_used == 0


def test_cli_greedy_matches_transformers(hf_checkpoints):
    path = hf_checkpoints["groups_yarn"]
    prompt = PROMPTS[1]
    out = subprocess.run(
        [sys.executable, "-m", "epserve.services.cli", "generate", "--model", str(path), "--prompt-ids",
         ",".join(map(str, prompt)), "--max-tokens", str(NEW_TOKENS), "--temperature", "0", "--ignore-eos",
         "--json", "--dtype", "float32", "--device", "cpu"],
        capture_output=True, text=True, check=True, timeout=300,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["token_ids"] == hf_greedy(path, prompt, NEW_TOKENS)[0]
    assert result["finish_reason"] == "length"
    assert result["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": NEW_TOKENS,
                               "total_tokens": len(prompt) + NEW_TOKENS}
