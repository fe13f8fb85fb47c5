"""The models a service can be asked for, known without weights or torch: ``tiny`` or a directory.

``model_config(name)`` and ``checkpoint_dir(name)`` are all the router needs (the config and the
tokenizer's directory); ``tiny.resolve_model`` (torch) also writes the built-in checkpoint on first
use, which only the services that load weights do.
"""
from __future__ import annotations

import os
from pathlib import Path

from epserve.services.model.config import ModelConfig

TINY_VERSION = 1
TINY_SEED = 1234
TINY_HF_CONFIG = {
    "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
    "num_hidden_layers": 4, "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
    "n_routed_experts": 32, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 4, "n_shared_experts": 1,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "q_lora_rank": 128, "kv_lora_rank": 128,
    "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "max_position_embeddings": 4096,
    "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "num_nextn_predict_layers": 1,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_act": "silu",
}


def cache_dir() -> Path:
    return Path(os.environ.get("EPSERVE_CACHE", Path.home() / ".cache" / "epserve"))


def tiny_dir() -> Path:
    """Where the built-in checkpoint is (or will be, once ``tiny.tiny_model_path`` wrote it)."""
    return cache_dir() / "models" / f"tiny-v{TINY_VERSION}"


def checkpoint_dir(name_or_dir: str) -> Path | None:
    """The checkpoint directory of ``name_or_dir``; None for ``tiny`` (it has no files of its own to read)."""
    if name_or_dir == "tiny":
        return None
    path = Path(name_or_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model: {name_or_dir!r} is neither 'tiny' nor a directory with config.json")
    return path


def model_config(name_or_dir: str) -> ModelConfig:
    """The model's config, read from its ``config.json`` (``tiny``: built in)."""
    path = checkpoint_dir(name_or_dir)
    return ModelConfig.from_dict(TINY_HF_CONFIG) if path is None else ModelConfig.from_hf(path)
