"""Multi-head latent attention (MLA) over a paged latent KV cache.

The cache of one layer is ``[num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]``: per token
only the normalised latent ``c_kv`` and the roped shared key ``k_rope``. Two paths:

- decode (one new token per sequence): weight-absorbed. ``q_nope`` is folded into the latent space
  through W_UK, attention runs directly on the latent rows (``epserve.kernels.mla_decode``), and the result
  goes back through W_UV. Nothing is decompressed.
- prefill (several new tokens, possibly after a cached prefix, i.e. chunked prefill):
  decompressed. The sequence's latent rows are read back from the cache, expanded by ``kv_b_proj``
  into per-head K/V, and attended causally.

A flat batch lists the decode sequences first, then the prefill sequences (``ForwardBatch``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from epserve.kernels.mla_decode import mla_decode
from epserve.services.model.config import ModelConfig
from epserve.services.model.layers import Linear, RMSNorm, RotaryEmbedding


@dataclass
class ForwardBatch:
    """Where the tokens of one forward pass sit: in their sequences and in the KV cache."""

    positions: torch.Tensor        # [tokens] int64: position of each token in its sequence
    slot_mapping: torch.Tensor     # [tokens] int64: cache slot (block * block_size + offset)
    query_lens: list[int]          # new tokens per sequence; sequences are contiguous in the batch
    context_lens: list[int]        # cached + new tokens per sequence, after this step
    block_table: torch.Tensor      # [seqs, max_blocks] int32
    context_lens_t: torch.Tensor   # [seqs] int32, context_lens on the model's device
    num_decodes: int               # the first num_decodes sequences have exactly one new token

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())


class MLA(nn.Module):
    def __init__(self, config: ModelConfig, rope: RotaryEmbedding):
        super().__init__()
        c = config
        self.heads, self.kv_lora_rank = c.num_attention_heads, c.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.scale = c.softmax_scale
        if c.q_lora_rank:
            self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = Linear(c.q_lora_rank, self.heads * c.qk_head_dim)
        else:
            self.q_proj = Linear(c.hidden_size, self.heads * c.qk_head_dim)
        self.kv_a_proj_with_mqa = Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = Linear(c.kv_lora_rank, self.heads * (c.qk_nope_head_dim + c.v_head_dim))
        self.o_proj = Linear(self.heads * c.v_head_dim, c.hidden_size)
        self.rope = rope
        self.w_kv_b: torch.Tensor | None = None  # [heads, nope_dim + v_dim, kv_lora_rank]
        self.w_uk: torch.Tensor | None = None    # [heads, nope_dim, kv_lora_rank] (view)
        self.w_uv: torch.Tensor | None = None    # [heads, v_dim, kv_lora_rank] (view)

    def absorb(self, kv_b_weight: torch.Tensor) -> None:
        """Split kv_b_proj's (dequantised) weight into the absorbed W_UK and W_UV; call after loading."""
        self.w_kv_b = kv_b_weight.view(self.heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        self.w_uk = self.w_kv_b[:, : self.nope_dim]
        self.w_uv = self.w_kv_b[:, self.nope_dim:]

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv_cache: torch.Tensor) -> torch.Tensor:
        """x [tokens, hidden] -> [tokens, hidden]; writes the tokens' latents into ``kv_cache``."""
        tokens = x.shape[0]
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(tokens, self.heads, self.nope_dim + self.rope_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = self.rope(q_rope, batch.positions)                       # [tokens, heads, rope]
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)                                  # [tokens, kv_lora_rank]
        k_rope = self.rope(k_rope[:, None, :], batch.positions)[:, 0]     # [tokens, rope]
        cache_rows = kv_cache.view(-1, kv_cache.shape[-1])
        cache_rows[batch.slot_mapping] = torch.cat([c_kv, k_rope], dim=-1).to(kv_cache.dtype)

        out = x.new_empty(tokens, self.heads, self.v_dim)
        n_dec = batch.num_decodes
        if n_dec:
            out[:n_dec] = self._decode(q_nope[:n_dec], q_rope[:n_dec], kv_cache, batch)
        if tokens > n_dec:
            out[n_dec:] = self._prefill(q_nope[n_dec:], q_rope[n_dec:], kv_cache, batch)
        return self.o_proj(out.view(tokens, self.heads * self.v_dim))

    def _decode(self, q_nope, q_rope, kv_cache, batch: ForwardBatch) -> torch.Tensor:
        """Absorbed path: q_nope [seqs, heads, nope], q_rope [seqs, heads, rope] -> [seqs, heads, v]."""
        n = q_nope.shape[0]
        q_latent = torch.einsum("thn,hnl->thl", q_nope, self.w_uk)      # [seqs, heads, kv_lora_rank]
        latent_out = mla_decode(q_latent.contiguous(), q_rope.contiguous(), kv_cache,
                                batch.block_table[:n], batch.context_lens_t[:n], self.scale)
        return torch.einsum("thl,hvl->thv", latent_out, self.w_uv)

    def _prefill(self, q_nope, q_rope, kv_cache, batch: ForwardBatch) -> torch.Tensor:
        """Decompressed path over each prefill sequence's cached context: -> [tokens, heads, v]."""
        outputs, start = [], 0
        block_size = kv_cache.shape[1]
        for seq in range(batch.num_decodes, len(batch.query_lens)):
            q_len, ctx = batch.query_lens[seq], batch.context_lens[seq]
            blocks = batch.block_table[seq, : -(-ctx // block_size)].long()
            rows = kv_cache[blocks].view(-1, kv_cache.shape[-1])[:ctx]    # [ctx, lora + rope]
            q = torch.cat([q_nope[start:start + q_len], q_rope[start:start + q_len]], dim=-1)
            outputs.append(self._attend(q, rows.to(q.dtype), ctx))
            start += q_len
        return torch.cat(outputs)

    def _attend(self, q: torch.Tensor, rows: torch.Tensor, ctx: int) -> torch.Tensor:
        """q [q_len, heads, qk] attends causally to ctx latent rows [ctx, lora + rope]."""
        q_len = q.shape[0]
        c_kv, k_rope = rows.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = torch.einsum("cl,hel->hce", c_kv, self.w_kv_b)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)          # [heads, ctx, nope|v]
        k = torch.cat([k_nope, k_rope[None].expand(self.heads, ctx, self.rope_dim)], dim=-1)
        query_pos = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
        visible = torch.arange(ctx, device=q.device)[None, :] <= query_pos   # [q_len, ctx]
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=visible, scale=self.scale)
        return out.transpose(0, 1)                                         # [q_len, heads, v]
