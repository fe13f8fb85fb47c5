"""ModelConfig: one dataclass for a DeepSeek-V3-architecture model, read from HF ``config.json``.

Field names are transformers' own (``n_routed_experts``, ``num_experts_per_tok``, ...), so a config
of DeepSeek-V3/R1, Kimi-K2 or a tiny model saved by ``DeepseekV3ForCausalLM.save_pretrained``
loads unchanged. Rope settings come from ``rope_scaling`` (original checkpoints) or
``rope_parameters`` (transformers >= 5).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings; ``type`` is ``default`` or ``yarn``."""

    type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0                     # yarn: context extension factor
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0                     # yarn: cos/sin magnitude numerator
    mscale_all_dim: float = 0.0             # yarn: softmax-scale correction (0 = none)
    attention_factor: float | None = None   # yarn: explicit cos/sin magnitude
    truncate: bool = True                   # yarn: floor/ceil the correction range

    @classmethod
    def from_hf(cls, raw: dict) -> "RopeConfig":
        params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ("default", "yarn"):
            raise ValueError(f"rope_scaling.type: unsupported rope type {rope_type!r}")
        if rope_type == "default":
            return cls(theta=theta)
        factor = params.get("factor")
        original = int(params.get("original_max_position_embeddings", raw.get("max_position_embeddings")))
        if factor is None:
            factor = raw["max_position_embeddings"] / original
        return cls(
            type="yarn", theta=theta, factor=float(factor), original_max_position_embeddings=original,
            beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
            mscale=float(params.get("mscale") or 0.0), mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
            attention_factor=params.get("attention_factor"), truncate=bool(params.get("truncate", True)),
        )


@dataclass(frozen=True)
class ModelConfig:
    """Every field of a DeepSeek-V3-architecture model that epserve uses (HF names)."""

    vocab_size: int
    hidden_size: int                        # D
    intermediate_size: int                  # dense MLP width (first_k_dense_replace layers)
    moe_intermediate_size: int              # I: width of one routed/shared expert
    num_hidden_layers: int
    num_attention_heads: int                # H
    n_routed_experts: int                   # E
    n_shared_experts: int
    num_experts_per_tok: int                # top-k
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    first_k_dense_replace: int
    kv_lora_rank: int                       # latent c_kv width (512 in V3)
    qk_nope_head_dim: int
    qk_rope_head_dim: int                   # shared roped key width (64 in V3)
    v_head_dim: int
    q_lora_rank: int | None = None          # None: plain q_proj (V2-Lite style)
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope: RopeConfig = field(default_factory=RopeConfig)
    rope_interleave: bool = True            # checkpoint stores rope dims as interleaved pairs
    moe_layer_freq: int = 1
    num_nextn_predict_layers: int = 0       # MTP modules stored at layer index num_hidden_layers
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    hidden_act: str = "silu"
    attention_bias: bool = False
    fp8_block: tuple[int, int] | None = None  # weight_block_size when the checkpoint is FP8
    torch_dtype: str = "bfloat16"

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_hf(cls, path: str | Path) -> "ModelConfig":
        """Read ``config.json`` from a checkpoint directory (or the file itself)."""
        path = Path(path)
        raw = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        archs = raw.get("architectures") or ["DeepseekV3ForCausalLM"]
        if not any(a in ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM") for a in archs):
            raise ValueError(f"architectures: expected DeepseekV3ForCausalLM, got {archs}")
        scoring = raw.get("scoring_func", "sigmoid")
        if scoring != "sigmoid":
            raise ValueError(f"scoring_func: only 'sigmoid' routing is supported, got {scoring!r}")
        names = {f.name for f in fields(cls)} - {"rope", "fp8_block", "torch_dtype"}
        kwargs = {k: raw[k] for k in names if raw.get(k) is not None}
        kwargs["rope"] = RopeConfig.from_hf(raw)
        kwargs["fp8_block"] = _fp8_block(raw.get("quantization_config"))
        kwargs["torch_dtype"] = str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16")
        config = cls(**kwargs)
        config.validate()
        return config

    def to_hf_dict(self) -> dict:
        """The config as HF ``config.json`` fields (round-trips through ``from_dict``)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("rope", "fp8_block")}
        out["architectures"] = ["DeepseekV3ForCausalLM"]
        out["model_type"] = "deepseek_v3"
        out["num_key_value_heads"] = self.num_attention_heads
        out["scoring_func"] = "sigmoid"
        out["topk_method"] = "noaux_tc"
        out["rope_theta"] = self.rope.theta
        if self.rope.type == "yarn":
            r = self.rope
            out["rope_scaling"] = {
                "type": "yarn", "factor": r.factor, "original_max_position_embeddings": r.original_max_position_embeddings,
                "beta_fast": r.beta_fast, "beta_slow": r.beta_slow, "mscale": r.mscale, "mscale_all_dim": r.mscale_all_dim,
            }
        if self.fp8_block:
            out["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": list(self.fp8_block)}
        return out

    def validate(self) -> None:
        checks = [
            (self.n_routed_experts % self.n_group == 0, "n_group must divide n_routed_experts"),
            (1 <= self.topk_group <= self.n_group, "topk_group must be in [1, n_group]"),
            (1 <= self.num_experts_per_tok <= self.topk_group * (self.n_routed_experts // self.n_group),
             "num_experts_per_tok must fit in the kept groups"),
            (self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even"),
            (0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace out of range"),
            (self.hidden_act == "silu", "hidden_act: only silu is supported"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    # ---- derived quantities -------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, list) else (eos,)

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def mtp_layers(self) -> list[int]:
        """Checkpoint layer indices of the multi-token-prediction modules."""
        return list(range(self.num_hidden_layers, self.num_hidden_layers + self.num_nextn_predict_layers))

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim**-0.5, times mscale**2 under YaRN (DeepSeek's softmax-scale correction)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope.type == "yarn" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    def kv_bytes_per_token_per_layer(self, element_size: int) -> int:
        """Latent cache: c_kv (kv_lora_rank) + k_rope (qk_rope_head_dim) per token per layer."""
        return (self.kv_lora_rank + self.qk_rope_head_dim) * element_size

    def kv_bytes_per_token(self, element_size: int) -> int:
        return self.num_hidden_layers * self.kv_bytes_per_token_per_layer(element_size)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of the main model (MTP excluded): total and activated per token.

        Activated counts what one token's forward pass multiplies by: every attention and dense
        weight, the LM head, the gates, the shared experts and top-k routed experts; the embedding
        is a lookup, not a multiply, so it is counted in total only.
        """
        d, heads = self.hidden_size, self.num_attention_heads
        q = (d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * heads * self.qk_head_dim
             if self.q_lora_rank else d * heads * self.qk_head_dim)
        kv = d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv += self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim)
        attn = q + kv + heads * self.v_head_dim * d + 2 * d           # + the two layer norms
        expert = 3 * d * self.moe_intermediate_size
        dense_mlp = 3 * d * self.intermediate_size
        gate = self.n_routed_experts * d + self.n_routed_experts
        n_moe = len(self.moe_layers)
        n_dense = self.num_hidden_layers - n_moe
        embed = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        common = self.num_hidden_layers * attn + n_dense * dense_mlp + n_moe * (gate + self.n_shared_experts * expert) + head + d
        total = embed + common + n_moe * self.n_routed_experts * expert
        activated = common + n_moe * self.num_experts_per_tok * expert
        return {"total": total, "activated": activated}


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _fp8_block(quant: dict | None) -> tuple[int, int] | None:
    if not quant:
        return None
    if quant.get("quant_method") != "fp8":
        raise ValueError(f"quantization_config.quant_method: only 'fp8' is supported, got {quant.get('quant_method')!r}")
    block = quant.get("weight_block_size") or [128, 128]
    return int(block[0]), int(block[1])
