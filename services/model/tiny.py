"""The built-in default model ``tiny``: a DeepSeek-V3-architecture checkpoint made locally.

Random weights from a fixed seed, saved once in HF format (``config.json`` + ``model.safetensors``,
HF tensor names, an MTP layer) under the cache directory, then read like any checkpoint. Nothing
is downloaded. The text it writes is noise: it exists to exercise every part of the system.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from epserve.services.model.catalog import TINY_HF_CONFIG, TINY_SEED, checkpoint_dir, tiny_dir
from epserve.services.model.config import ModelConfig


def tiny_model_path() -> Path:
    """The tiny checkpoint's directory, created deterministically on first use."""
    path = tiny_dir()
    if not (path / "model.safetensors").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent))
        try:
            write_random_checkpoint(TINY_HF_CONFIG, staging, TINY_SEED)
            os.replace(staging, path)
        except OSError:
            if not (path / "model.safetensors").exists():    # not a concurrent writer's win
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return path


def resolve_model(name_or_dir: str) -> Path:
    """``tiny`` -> the built-in checkpoint (written on first use); else a local checkpoint directory."""
    return checkpoint_dir(name_or_dir) or tiny_model_path()


def write_random_checkpoint(hf_config: dict, directory: Path, seed: int) -> None:
    config = ModelConfig.from_dict(hf_config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: _init(name, shape, generator) for name, shape in tensor_shapes(config).items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))


def _init(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith("e_score_correction_bias"):       # float32, as in DeepSeek's checkpoints
        return torch.randn(shape, generator=generator) * 0.05
    fan_in = shape[-1]
    return (torch.randn(shape, generator=generator) * (0.7 / fan_in ** 0.5)).to(torch.bfloat16)


def tensor_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an HF DeepSeek-V3 checkpoint with config ``c`` (MTP layers included)."""
    d, heads = c.hidden_size, c.num_attention_heads
    shapes = {"model.embed_tokens.weight": (c.vocab_size, d), "model.norm.weight": (d,), "lm_head.weight": (c.vocab_size, d)}
    for layer in range(c.num_hidden_layers + c.num_nextn_predict_layers):
        p = f"model.layers.{layer}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_a_proj.weight": (c.q_lora_rank, d),
                       p + "self_attn.q_a_layernorm.weight": (c.q_lora_rank,),
                       p + "self_attn.q_b_proj.weight": (heads * c.qk_head_dim, c.q_lora_rank),
                       p + "self_attn.kv_a_proj_with_mqa.weight": (c.kv_lora_rank + c.qk_rope_head_dim, d),
                       p + "self_attn.kv_a_layernorm.weight": (c.kv_lora_rank,),
                       p + "self_attn.kv_b_proj.weight": (heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
                       p + "self_attn.o_proj.weight": (d, heads * c.v_head_dim)})
        if layer >= c.num_hidden_layers:
            shapes.update({p + "enorm.weight": (d,), p + "hnorm.weight": (d,), p + "eh_proj.weight": (d, 2 * d),
                           p + "shared_head.norm.weight": (d,)})
        if not c.is_moe_layer(layer) and layer < c.num_hidden_layers:
            shapes.update(_mlp_shapes(p + "mlp.", d, c.intermediate_size))
            continue
        shapes.update({p + "mlp.gate.weight": (c.n_routed_experts, d), p + "mlp.gate.e_score_correction_bias": (c.n_routed_experts,)})
        shapes.update(_mlp_shapes(p + "mlp.shared_experts.", d, c.moe_intermediate_size * c.n_shared_experts))
        for e in range(c.n_routed_experts):
            shapes.update(_mlp_shapes(f"{p}mlp.experts.{e}.", d, c.moe_intermediate_size))
    return shapes


def _mlp_shapes(prefix: str, d: int, inner: int) -> dict[str, tuple[int, int]]:
    return {prefix + "gate_proj.weight": (inner, d), prefix + "up_proj.weight": (inner, d),
            prefix + "down_proj.weight": (d, inner)}
