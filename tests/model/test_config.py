"""ModelConfig from HF config.json: the real DeepSeek-V3 config, sizes, validation."""
from pathlib import Path

import pytest

from epserve.services.model.config import ModelConfig

pytestmark = pytest.mark.unit

V3_CONFIG = Path(__file__).parent.parent / "fixtures" / "deepseek_v3_config.json"


def test_real_deepseek_v3_config_loads():
    c = ModelConfig.from_hf(V3_CONFIG)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group) == (256, 8, 8, 4)
    assert c.fp8_block == (128, 128)
    assert c.rope.type == "yarn" and c.rope.factor == 40 and c.rope.original_max_position_embeddings == 4096
    assert c.moe_layers == list(range(3, 61))
    assert c.num_nextn_predict_layers == 1


def test_v3_parameter_counts():
    counts = ModelConfig.from_hf(V3_CONFIG).parameter_counts()
    assert abs(counts["total"] / 671e9 - 1) < 0.01
    # DeepSeek publishes "37B activated"; we count 36.63B (every multiplied weight, embedding lookup
    # excluded), which rounds to the published figure: 1.01% under 37.0.
    assert round(counts["activated"] / 1e9) == 37
    assert abs(counts["activated"] / 37e9 - 1) < 0.011


def test_v3_kv_cache_bytes():
    c = ModelConfig.from_hf(V3_CONFIG)
    assert c.kv_bytes_per_token_per_layer(2) == (512 + 64) * 2
    assert c.kv_bytes_per_token(2) == 70_272


def test_yarn_softmax_scale_includes_mscale_squared():
    c = ModelConfig.from_hf(V3_CONFIG)
    mscale = 0.1 * 1.0 * __import__("math").log(40) + 1.0
    assert c.softmax_scale == pytest.approx(192 ** -0.5 * mscale * mscale)


def test_round_trip_through_hf_dict():
    c = ModelConfig.from_hf(V3_CONFIG)
    assert ModelConfig.from_dict(c.to_hf_dict()) == c


@pytest.mark.parametrize("field,value,message", [
    ("n_group", 7, "n_group"), ("topk_group", 9, "topk_group"), ("num_experts_per_tok", 200, "num_experts_per_tok"),
    ("scoring_func", "softmax", "scoring_func"), ("architectures", ["LlamaForCausalLM"], "architectures"),
])
def test_invalid_configs_name_the_field(field, value, message):
    raw = ModelConfig.from_hf(V3_CONFIG).to_hf_dict()
    raw[field] = value
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(raw)
