"""The latent KV cache holds exactly c_kv + k_rope per token per layer."""
import json
import subprocess
import sys

import pytest
import torch

from epserve.services.engine.engine import EngineConfig, LLMEngine
from epserve.services.model.tiny import tiny_model_path

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kv_bytes_per_token_per_layer_is_latent_plus_rope(dtype):
    engine = LLMEngine.from_path(tiny_model_path(), EngineConfig(block_size=8, num_kv_blocks=4), dtype=dtype)
    c = engine.model_config
    per_layer = (c.kv_lora_rank + c.qk_rope_head_dim) * dtype.itemsize
    caches = engine.runner.kv_caches
    assert len(caches) == c.num_hidden_layers
    for cache in caches:
        assert cache.shape == (4, 8, c.kv_lora_rank + c.qk_rope_head_dim) and cache.dtype == dtype
        assert cache[0, 0].numel() * cache.element_size() == per_layer
    assert engine.runner.kv_bytes_per_token == c.num_hidden_layers * per_layer


def test_cli_reports_kv_bytes_per_token():
    out = subprocess.run([sys.executable, "-m", "epserve.services.cli", "generate", "--prompt", "hi", "--max-tokens", "3",
                          "--json", "--dtype", "bfloat16"], capture_output=True, text=True, check=True, timeout=240)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    with open(tiny_model_path() / "config.json") as f:
        config = json.load(f)
    assert result["kv_cache_bytes_per_token"] == config["num_hidden_layers"] * (
        config["kv_lora_rank"] + config["qk_rope_head_dim"]) * 2
    assert len(result["token_ids"]) == result["usage"]["completion_tokens"] <= 3
