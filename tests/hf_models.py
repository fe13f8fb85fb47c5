"""Random tiny DeepSeek-V3 checkpoints saved by transformers itself, and the reference generation."""
from __future__ import annotations

from pathlib import Path

import torch

# Each config is a distinct corner of the architecture; all are small enough for 2 CPU cores.
TINY_CONFIGS = {
    # groups with topk_group < n_group, YaRN, >= 32 experts with top-6, q_lora
    "groups_yarn": dict(
        vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=6, n_group=4,
        topk_group=2, first_k_dense_replace=1, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=512, routed_scaling_factor=2.5,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
    # no q_lora (plain q_proj), one group, default rope, two dense layers, two shared experts
    "plain_q": dict(
        vocab_size=280, hidden_size=48, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=2, n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=4, n_group=1,
        topk_group=1, first_k_dense_replace=2, q_lora_rank=None, kv_lora_rank=24, qk_nope_head_dim=12,
        qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=256, routed_scaling_factor=1.5,
    ),
    # the V3 group shape scaled down (8 groups keep 4, top-8 of 64), YaRN with mscale != mscale_all_dim
    "v3_shape": dict(
        vocab_size=320, hidden_size=64, intermediate_size=128, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=8, n_group=8,
        topk_group=4, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=1024, routed_scaling_factor=2.5,
        rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.8, "mscale_all_dim": 0.6},
    ),
}


def save_tiny_checkpoint(name: str, directory: Path, seed: int = 0) -> Path:
    """Build ``TINY_CONFIGS[name]`` with random weights and a non-zero correction bias; save it."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    fields = dict(TINY_CONFIGS[name])
    config = DeepseekV3Config(num_key_value_heads=fields["num_attention_heads"], initializer_range=0.1,
                              bos_token_id=0, eos_token_id=1, **fields)
    model = DeepseekV3ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers[config.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.05)
    path = directory / name
    model.save_pretrained(path)
    return path


# Prompts of 1, 7 and 23 tokens, used by every parity test.
PARITY_PROMPTS = [[7], [5, 17, 42, 99, 3, 250, 7], [(11 * i + 3) % 250 + 2 for i in range(23)]]


def greedy_with_logits(engine, prompts: list[list[int]], new_tokens: int) -> list[tuple[list[int], torch.Tensor]]:
    """Our greedy generation of all prompts in one batch: (token ids, per-step logits [steps, vocab]) each."""
    from epserve.services.engine.params import SamplingParams

    logits_seen: dict[str, list[torch.Tensor]] = {}
    sample = engine.runner.sample

    def recording_sample(seqs, logits):
        for seq, row in zip(seqs, logits):
            logits_seen.setdefault(seq.request_id, []).append(row.clone())
        return sample(seqs, logits)

    engine.runner.sample = recording_sample
    seqs = engine.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
    return [(s.output_ids, torch.stack(logits_seen[s.request_id])) for s in seqs]


def hf_greedy(path: Path, prompt: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """transformers' own greedy generate in float32: new token ids and per-step logits [steps, vocab]."""
    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    return tokens, torch.cat(out.logits).float()
