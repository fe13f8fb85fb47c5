"""FP8 block-quantised, sharded checkpoints: selective loading and greedy parity."""
import json

import pytest
import torch
from safetensors.torch import save_file

from epserve.kernels.fp8 import FP8_BLOCK, FP8_DTYPE, fp8_weight_dequant
from epserve.services.engine.engine import EngineConfig, LLMEngine
from epserve.services.engine.params import SamplingParams
from epserve.services.model.checkpoint import SCALE_SUFFIX, CheckpointReader, write_fp8_checkpoint
from epserve.services.model.config import ModelConfig
from epserve.services.model.moe import load_expert_weights
from tests.hf_models import hf_greedy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fp8_dirs(hf_checkpoints, tmp_path_factory):
    """(fp8 sharded copy, its dequantised float copy that transformers can load)."""
    root = tmp_path_factory.mktemp("fp8")
    fp8, dequantised = root / "fp8", root / "dequantised"
    write_fp8_checkpoint(hf_checkpoints["v3_shape"], fp8, num_shards=3)
    reader = CheckpointReader(fp8)
    tensors = reader.read(reader.names())
    plain = {n: fp8_weight_dequant(t, tensors[n + SCALE_SUFFIX]) if n + SCALE_SUFFIX in tensors else t.float()
             for n, t in tensors.items() if not n.endswith(SCALE_SUFFIX)}
    dequantised.mkdir()
    save_file(plain, str(dequantised / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((fp8 / "config.json").read_text())
    del config["quantization_config"]
    (dequantised / "config.json").write_text(json.dumps(config))
    return fp8, dequantised


def test_fp8_sharded_checkpoint_greedy_matches_transformers_on_dequantised_weights(fp8_dirs):
    fp8, dequantised = fp8_dirs
    config = ModelConfig.from_hf(fp8)
    assert config.fp8_block == (FP8_BLOCK, FP8_BLOCK)
    assert len(set(json.loads((fp8 / "model.safetensors.index.json").read_text())["weight_map"].values())) == 3
    engine = LLMEngine.from_path(fp8, EngineConfig(block_size=8, num_kv_blocks=32), dtype=torch.float32)
    experts = engine.model.model.layers[1].mlp.backend.layers[1]
    assert experts.w_gate.dtype == FP8_DTYPE and experts.w_gate_scale is not None
    prompt = [3, 14, 15, 92, 65, 35]
    seq = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert seq.output_ids == hf_greedy(dequantised, prompt, 24)[0]


def test_selective_loading_reads_only_requested_experts(fp8_dirs):
    fp8, _ = fp8_dirs
    config = ModelConfig.from_hf(fp8)
    reader = CheckpointReader(fp8)
    wanted = [3, 17, 40]
    for layer in config.moe_layers:
        weights = load_expert_weights(reader, layer, wanted, dtype=torch.float32, device="cpu")
        assert weights.w_gate.shape[0] == 3 and weights.w_down_scale.shape[0] == 3
    expected = {f"model.layers.{layer}.mlp.experts.{e}.{p}.weight{s}" for layer in config.moe_layers
                for e in wanted for p in ("gate_proj", "up_proj", "down_proj") for s in ("", SCALE_SUFFIX)}
    assert reader.names_read == expected


def test_loading_without_routed_experts_reads_no_expert_tensor(fp8_dirs):
    from epserve.services.model.deepseek_v3 import DeepseekV3ForCausalLM
    from epserve.services.model.layers import RotaryEmbedding
    from epserve.services.model.moe import LocalExperts

    fp8, _ = fp8_dirs
    config = ModelConfig.from_hf(fp8)
    reader = CheckpointReader(fp8)
    rope = RotaryEmbedding(config, "cpu")
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config, LocalExperts({}), rope, with_mtp=False)
    model.load(reader, torch.float32, "cpu")
    assert reader.names_read and not any(".mlp.experts." in n for n in reader.names_read)
    assert reader.names_read | {n for n in reader.names() if ".mlp.experts." in n} == set(reader.names())


def test_mtp_layer_loads_only_when_asked():
    from epserve.services.model.deepseek_v3 import load_model
    from epserve.services.model.tiny import tiny_model_path

    model = load_model(tiny_model_path(), dtype=torch.float32)
    n = model.config.num_hidden_layers
    assert model.config.num_nextn_predict_layers == 1                   # the checkpoint has one
    assert not model.with_mtp and len(model.model.layers) == n
    assert n not in model.model.layers[-1].mlp.backend.layers           # nor its routed experts
    assert not any(name.startswith(f"model.layers.{n}.") for name, _ in model.named_parameters())


def test_mtp_layer_of_the_builtin_model_loads():
    from epserve.services.model.deepseek_v3 import load_model
    from epserve.services.model.tiny import tiny_model_path

    model = load_model(tiny_model_path(), dtype=torch.float32, with_mtp=True)
    n = model.config.num_hidden_layers
    assert model.with_mtp and len(model.model.layers) == n + 1
    mtp = model.model.layers[n]
    assert mtp.eh_proj.weight.shape == (model.config.hidden_size, 2 * model.config.hidden_size)
    assert n in mtp.mlp.backend.layers                                  # its routed experts too


def test_missing_checkpoint_gives_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        CheckpointReader(tmp_path)
