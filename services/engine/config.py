"""The engine's settings (no torch here: the command line and the router read them too)."""
from __future__ import annotations

from dataclasses import dataclass

from epserve.services.flags import setting


@dataclass(kw_only=True)
class EngineConfig:
    block_size: int = setting(16, low=1, help="tokens per KV-cache block")
    num_kv_blocks: int = setting(2048, low=1, help="KV-cache blocks (the cache holds num_kv_blocks x block_size tokens)")
    max_num_seqs: int = setting(64, low=1, help="sequences in one step at most")
    max_num_batched_tokens: int = setting(1024, low=1, help="token budget of one step (decodes + prefill chunks)")
    max_model_len: int | None = setting(None, low=1, help="longest prompt + output (default: the model's context)")
    micro_batches: int = setting(2, low=1, high=4, help="micro-batches in flight (2-4 hide remote expert round trips)")
    micro_batch_min_tokens: int = setting(
        128, low=1, help="split a step only into micro-batches of at least this many tokens "
                  "(bench_micro_batches: on the CPU a smaller split costs more than it hides)")
    load_mtp: bool = setting(False, help="load the multi-token-prediction layer (not run yet: speculative "
                                         "decoding will use it; about 11B parameters for DeepSeek-V3)")
