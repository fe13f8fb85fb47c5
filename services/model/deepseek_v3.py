"""The DeepSeek-V3 causal LM over a flat batch of tokens, and its selective checkpoint loading.

Module and buffer names mirror the HF checkpoint (``model.layers.3.self_attn.q_a_proj.weight``),
so a buffer's name is the tensor's name. Routed experts are not buffers of this module: they sit
behind the expert backend (in-process or remote shards), which loads them itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from epserve.kernels.backend import use_triton
from epserve.kernels.fp8 import fp8_weight_dequant
from epserve.services.model.checkpoint import SCALE_SUFFIX, CheckpointReader
from epserve.services.model.config import ModelConfig
from epserve.services.model.layers import MLP, Embedding, Linear, RMSNorm, RotaryEmbedding
from epserve.services.model.mla import MLA, ForwardBatch
from epserve.services.model.moe import ExpertBackend, LocalExperts, MoE


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, rope: RotaryEmbedding, backend: ExpertBackend):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, rope)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer) or layer >= config.num_hidden_layers:
            self.mlp = MoE(config, layer, backend)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def start(self, x: torch.Tensor, batch: ForwardBatch, kv_cache: torch.Tensor) -> tuple:
        """Attention, then start the FFN: a MoE layer dispatches to its experts and returns at once."""
        x = x + self.self_attn(self.input_layernorm(x), batch, kv_cache)
        h = self.post_attention_layernorm(x)
        return x, h, self.mlp.start(h) if isinstance(self.mlp, MoE) else self.mlp(h)

    def finish(self, x: torch.Tensor, h: torch.Tensor, ffn: Any) -> torch.Tensor:
        """x [tokens, hidden] residual + the FFN output (combining routed experts for MoE layers)."""
        return x + (self.mlp.finish(h, ffn) if isinstance(self.mlp, MoE) else ffn)


class MTPLayer(DecoderLayer):
    """Multi-token prediction module (checkpoint layer index ``num_hidden_layers``).

    Predicts token t+2 from the main model's last hidden state at t and the embedding of token
    t+1: ``eh_proj([enorm(embed(t+1)); hnorm(h_t)])`` -> a full decoder layer -> ``shared_head``.
    It shares the main model's embedding and LM head.
    """

    def __init__(self, config: ModelConfig, layer: int, rope: RotaryEmbedding, backend: ExpertBackend):
        super().__init__(config, layer, rope, backend)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = Linear(2 * config.hidden_size, config.hidden_size)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekV3Model(nn.Module):
    def __init__(self, config: ModelConfig, backend: ExpertBackend, rope: RotaryEmbedding, with_mtp: bool):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        n = config.num_hidden_layers
        layers = [DecoderLayer(config, i, rope, backend) for i in range(n)]
        if with_mtp:
            layers += [MTPLayer(config, i, rope, backend) for i in config.mtp_layers]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekV3ForCausalLM(nn.Module):
    """forward([(token ids, batch), ...], kv caches) -> hidden states per micro-batch;
    compute_logits(hidden) -> logits."""

    def __init__(self, config: ModelConfig, backend: ExpertBackend, rope: RotaryEmbedding, with_mtp: bool = False):
        super().__init__()
        self.config = config
        self.with_mtp = with_mtp and config.num_nextn_predict_layers > 0
        self.model = DeepseekV3Model(config, backend, rope, self.with_mtp)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)

    @torch.inference_mode()
    def forward(self, micro_batches: list[tuple[torch.Tensor, ForwardBatch]],
                kv_caches: list[torch.Tensor]) -> list[torch.Tensor]:
        """One or more independent micro-batches (input_ids [tokens_i] each), interleaved layer by
        layer (two-batch overlap).

        Micro-batch i starts layer L (attention + expert dispatch) right after finishing layer L-1
        (shared expert + combine), so while its routed experts run remotely the other micro-batches
        compute. Returns final-normed hidden states [tokens_i, hidden] per micro-batch.
        """
        layers = self.model.layers
        xs = [self.model.embed_tokens(ids) for ids, _ in micro_batches]
        pending: list[tuple | None] = [None] * len(micro_batches)
        for layer in range(self.config.num_hidden_layers):
            for i, (_, batch) in enumerate(micro_batches):
                if pending[i] is not None:
                    xs[i] = layers[layer - 1].finish(*pending[i])
                pending[i] = layers[layer].start(xs[i], batch, kv_caches[layer])
        last = layers[self.config.num_hidden_layers - 1]
        return [self.model.norm(last.finish(*state)) for state in pending]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [seqs, hidden] -> logits [seqs, vocab] float32."""
        return self.lm_head(hidden).float()

    # ---- loading -------------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        """Checkpoint names this module reads (routed experts excluded: the backend owns them)."""
        names = [n for n, _ in self.named_buffers()]
        if self.config.tie_word_embeddings:
            names.remove("lm_head.weight")
        return names

    def load(self, reader: CheckpointReader, dtype: torch.dtype, device: torch.device | str) -> None:
        """Read this module's tensors; FP8 linears stay FP8 on Triton devices, else dequantise."""
        names = self.tensor_names()
        scales = [n + SCALE_SUFFIX for n in names if n + SCALE_SUFFIX in reader]
        tensors = reader.read(names + scales)
        keep_fp8 = use_triton(torch.empty(0, device=device))
        for name in names:
            value = tensors[name]
            scale = tensors.get(name + SCALE_SUFFIX)
            module_name, _, attr = name.rpartition(".")
            module = self.get_submodule(module_name)
            if scale is not None and keep_fp8 and isinstance(module, Linear):
                module.weight = value.to(device)
                module.weight_scale_inv = scale.float().to(device)
                continue
            if scale is not None:
                value = fp8_weight_dequant(value, scale, dtype=torch.float32)
            keep_float32 = attr == "e_score_correction_bias" or module_name.endswith("mlp.gate")
            setattr(module, attr, value.to(device=device, dtype=torch.float32 if keep_float32 else dtype))
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        unloaded = [n for n, b in self.named_buffers() if b.is_meta]
        if unloaded:
            raise ValueError(f"checkpoint is missing tensors: {unloaded[:5]}")
        for layer in self.model.layers:
            layer.self_attn.absorb(_dense_weight(layer.self_attn.kv_b_proj, dtype))


def _dense_weight(linear: Linear, dtype: torch.dtype) -> torch.Tensor:
    if linear.weight_scale_inv is None:
        return linear.weight
    return fp8_weight_dequant(linear.weight, linear.weight_scale_inv, dtype=dtype)


def load_model(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
               backend: ExpertBackend | None = None, with_mtp: bool = False) -> DeepseekV3ForCausalLM:
    """Load a checkpoint directory. Without ``backend``, every routed expert loads in-process.

    The multi-token-prediction layer (a whole MoE layer) loads only ``with_mtp`` and when the
    checkpoint has it: nothing runs it yet (speculative decoding will).
    """
    config = ModelConfig.from_hf(path)
    reader = CheckpointReader(path)
    with_mtp = with_mtp and all(f"model.layers.{i}.eh_proj.weight" in reader for i in config.mtp_layers)
    if backend is None:
        layers = config.moe_layers + (config.mtp_layers if with_mtp else [])
        backend = LocalExperts.load(reader, config, layers, dtype=dtype, device=device)
    rope = RotaryEmbedding(config, device)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config, backend, rope, with_mtp)
    model.load(reader, dtype, device)
    return model.eval()
