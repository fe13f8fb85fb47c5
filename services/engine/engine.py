"""The single-process engine: requests in, tokens out, continuously batched.

Pipeline of one ``step()`` (all in this process, on the model's device):
``Scheduler.schedule`` (CPU: who runs, how many tokens) -> ``ModelRunner.step`` (device: flat
batch forward over the paged latent cache) -> ``sample`` (device: one token per finished
prefill/decode, and its logprobs where asked) -> stop checks and block freeing (CPU) ->
``RequestOutput`` per request touched.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from epserve.services.engine.block_manager import BlockManager
from epserve.services.engine.config import EngineConfig
from epserve.services.engine.model_runner import ModelRunner
from epserve.services.engine.params import InvalidParam, SamplingParams, TokenLogprobs, draw_seed
from epserve.services.engine.scheduler import Scheduler
from epserve.services.engine.sequence import Sequence
from epserve.services.engine.tokenizer import Tokenizer, load_tokenizer
from epserve.services.model.deepseek_v3 import DeepseekV3ForCausalLM, load_model
from epserve.services.model.moe import ExpertBackend


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprobs] | None = None   # one per new token, when the request asked for logprobs


class LLMEngine:
    def __init__(self, model: DeepseekV3ForCausalLM, tokenizer: Tokenizer, config: EngineConfig,
                 dtype: torch.dtype, device: torch.device | str):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.model_config = model.config
        self.max_model_len = min(config.max_model_len or 1 << 62, self.model_config.max_position_embeddings)
        self.blocks = BlockManager(config.num_kv_blocks, config.block_size)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, config.num_kv_blocks, config.block_size, dtype, device,
                                  config.micro_batches, config.micro_batch_min_tokens)
        self.requests: dict[str, Sequence] = {}
        self._generate_ids = itertools.count()

    @classmethod
    def from_path(cls, path: str | Path, config: EngineConfig | None = None, *, dtype: torch.dtype | None = None,
                  device: str = "cpu", backend: ExpertBackend | None = None) -> "LLMEngine":
        config = config or EngineConfig()
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        model = load_model(path, dtype=dtype, device=device, backend=backend, with_mtp=config.load_mtp)
        c = model.config
        tokenizer = load_tokenizer(path, vocab_size=c.vocab_size, bos_token_id=c.bos_token_id, eos_token_ids=c.eos_token_ids)
        return cls(model, tokenizer, config, dtype, device)

    # ---- requests --------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    emitted_ids: list[int] = ()) -> None:
        """Validate and queue a request; raises InvalidParam naming the offending field.

        ``emitted_ids`` continues a request that already emitted those tokens elsewhere: they are
        recomputed as context and count towards ``max_tokens``, and sampling resumes at their step.
        """
        if request_id in self.requests:
            raise InvalidParam("request_id", f"{request_id!r} is already running")
        self.validate(prompt_ids, params, emitted_ids)
        seed = params.seed if params.seed is not None else draw_seed()
        seq = Sequence(request_id, list(prompt_ids), params, seed, output_ids=list(emitted_ids))
        self.requests[request_id] = seq
        self.scheduler.add(seq)

    def validate(self, prompt_ids: list[int], params: SamplingParams, emitted_ids: list[int] = ()) -> None:
        """InvalidParam naming the field unless the request fits (``emitted_ids`` count towards max_tokens)."""
        vocab = self.model_config.vocab_size
        if not prompt_ids:
            raise InvalidParam("prompt", "must not be empty")
        bad = next((t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidParam("prompt_ids", f"every token id must be in [0, {vocab}), got {bad!r}")
        capacity = min(self.max_model_len, self.blocks.num_blocks * self.blocks.block_size)
        if len(prompt_ids) >= capacity:
            raise InvalidParam("prompt", f"{len(prompt_ids)} tokens leave no room in the context of {capacity}")
        params.validate(vocab_size=vocab, max_new_tokens_allowed=capacity - len(prompt_ids))
        if len(emitted_ids) >= params.max_tokens:
            raise InvalidParam("emitted_ids", f"{len(emitted_ids)} tokens already reach max_tokens={params.max_tokens}")

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        return self._output(seq, [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- the loop --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        logits_by_id = self.runner.step(batch)
        if not logits_by_id:
            return []
        seqs = [self.requests[rid] for rid in logits_by_id]
        tokens, logprobs = self.runner.sample(seqs, torch.stack(list(logits_by_id.values())))
        return [self._append(seq, token, lp) for seq, token, lp in zip(seqs, tokens, logprobs)]

    def _append(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None) -> RequestOutput:
        seq.output_ids.append(token)
        reason = seq.params.finish_reason(seq.output_ids, self.model_config.eos_token_ids,
                                          context_full=seq.num_tokens >= self.max_model_len)
        if reason:
            self.scheduler.finish(seq, reason)
            del self.requests[seq.request_id]
        return self._output(seq, [token], None if logprobs is None else [logprobs])

    @staticmethod
    def _output(seq: Sequence, new_tokens: list[int], logprobs: list[TokenLogprobs] | None = None) -> RequestOutput:
        return RequestOutput(seq.request_id, new_tokens, seq.finished, seq.finish_reason,
                             len(seq.prompt_ids), len(seq.output_ids), logprobs)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        """Run prompts to completion together; returns the finished sequences in prompt order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        seqs = []
        for prompt, p in zip(prompts, params_list):
            request_id = f"generate-{next(self._generate_ids)}"
            self.add_request(request_id, prompt, p)
            seqs.append(self.requests[request_id])
        while any(not s.finished for s in seqs):
            self.step()
        return seqs

    def stats(self) -> dict[str, int]:
        return {"kv_blocks_total": self.blocks.num_blocks, "kv_blocks_used": self.blocks.num_used,
                "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting)}
