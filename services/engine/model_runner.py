"""Runs one scheduled batch through the model: builds the flat batch, owns the KV cache, samples."""
from __future__ import annotations

import torch

from epserve.services.engine.logprobs import token_logprobs
from epserve.services.engine.params import TokenLogprobs
from epserve.services.engine.sampling import sample
from epserve.services.engine.scheduler import ScheduledBatch
from epserve.services.engine.sequence import Sequence
from epserve.services.model.deepseek_v3 import DeepseekV3ForCausalLM
from epserve.services.model.mla import ForwardBatch


class ModelRunner:
    def __init__(self, model: DeepseekV3ForCausalLM, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str, micro_batches: int = 1,
                 micro_batch_min_tokens: int = 1):
        c = model.config
        self.model, self.block_size, self.device = model, block_size, torch.device(device)
        self.micro_batches, self.micro_batch_min_tokens = micro_batches, max(1, micro_batch_min_tokens)
        width = c.kv_lora_rank + c.qk_rope_head_dim
        self.kv_caches = [torch.zeros(num_blocks, block_size, width, dtype=dtype, device=device)
                          for _ in range(c.num_hidden_layers)]              # per layer [blocks, block_size, lora + rope]
        self.kv_bytes_per_token = c.num_hidden_layers * width * self.kv_caches[0].element_size()

    def step(self, batch: ScheduledBatch) -> dict[str, torch.Tensor]:
        """Run the batch; returns {request_id: logits [vocab]} for sequences whose pending tokens are all done."""
        groups = self._split(batch)
        inputs = [self._build(seqs, chunks, decodes) for seqs, chunks, decodes in groups]
        hiddens = self.model(inputs, self.kv_caches)      # [tokens_i, hidden] each
        last_rows, finished = [], []
        for (seqs, chunks, _), (_, forward_batch), hidden in zip(groups, inputs, hiddens):
            ends = torch.tensor(forward_batch.query_lens, device=self.device).cumsum(0) - 1
            for i, (seq, n) in enumerate(zip(seqs, chunks)):
                if seq.num_computed + n == seq.num_tokens:
                    last_rows.append(hidden[ends[i]])
                    finished.append(seq.request_id)
                seq.num_computed += n
        if not finished:
            return {}
        logits = self.model.compute_logits(torch.stack(last_rows))
        return dict(zip(finished, logits))

    def _split(self, batch: ScheduledBatch) -> list[tuple[list[Sequence], list[int], int]]:
        """Up to ``micro_batches`` groups of whole sequences, balanced by tokens, decodes first in each;
        fewer when a group would get under ``micro_batch_min_tokens`` tokens (a small batch is
        bound by per-call overhead, which splitting multiplies)."""
        work = [(s, 1) for s in batch.decodes] + list(batch.prefills)
        count = max(1, min(self.micro_batches, len(work)))
        while True:
            groups, tokens = self._fill(work, len(batch.decodes), count)
            if count == 1 or min(tokens) >= self.micro_batch_min_tokens:
                return groups
            count -= 1

    @staticmethod
    def _fill(work: list[tuple[Sequence, int]], num_decodes: int, count: int):
        """``work`` into ``count`` groups, each item to the group with the fewest tokens so far."""
        groups = [([], [], 0) for _ in range(count)]
        tokens = [0] * count
        for index, (seq, n) in enumerate(work):
            g = min(range(count), key=lambda i: tokens[i])
            seqs, chunks, decodes = groups[g]
            groups[g] = (seqs + [seq], chunks + [n], decodes + (index < num_decodes))
            tokens[g] += n
        return groups, tokens

    def sample(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits [seqs, vocab] -> one token per sequence (step = tokens it has emitted so far), and its
        logprobs for the sequences that asked (None for the others)."""
        tokens = sample(logits, [s.params for s in seqs], [s.seed for s in seqs], [len(s.output_ids) for s in seqs])
        logprobs = token_logprobs(logits, tokens, [s.params.logprobs for s in seqs])
        return tokens.tolist(), logprobs

    def _build(self, seqs: list[Sequence], chunks: list[int], num_decodes: int) -> tuple[torch.Tensor, ForwardBatch]:
        ids, positions, slots = [], [], []
        for seq, n in zip(seqs, chunks):
            start = seq.num_computed
            ids += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            slots += [seq.block_table[p // self.block_size] * self.block_size + p % self.block_size
                      for p in range(start, start + n)]
        max_blocks = max(len(s.block_table) for s in seqs)
        table = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
        for i, seq in enumerate(seqs):
            table[i, : len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
        context = [s.num_computed + n for s, n in zip(seqs, chunks)]
        batch = ForwardBatch(
            positions=self._tensor(positions, torch.int64), slot_mapping=self._tensor(slots, torch.int64),
            query_lens=list(chunks), context_lens=context, block_table=table.to(self.device),
            context_lens_t=self._tensor(context, torch.int32), num_decodes=num_decodes,
        )
        return self._tensor(ids, torch.int64), batch

    def _tensor(self, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)
