"""Log-probabilities of sampled tokens, for the requests that ask (``SamplingParams.logprobs``).

They are of the model's raw distribution, ``log_softmax(logits)`` in float32, before temperature,
top-k and top-p (vLLM's default, its "raw_logprobs"): what the model makes of each token, whatever
the sampler then did with it, so a greedy and a sampled request see the same numbers. They are
computed on the logits' device, for the asking rows only, in one batched op per step; a step where
no request asks costs nothing. One copy to the host per step brings them back.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from epserve.services.engine.params import TokenLogprobs


def token_logprobs(logits: Tensor, tokens: Tensor, wanted: Sequence[int | None]) -> list[TokenLogprobs | None]:
    """The logprobs of each row's sampled token and of its ``wanted[i]`` most probable tokens.

    logits: [B, V] float (the sampler's input); tokens: [B] int64 sampled ids, on the same device;
    wanted: per row None (not asked: None in the result) or how many alternatives (0 = the sampled
    token's logprob only). Ties among the alternatives are in ``torch.topk``'s order.
    """
    rows = [i for i, n in enumerate(wanted) if n is not None]
    result: list[TokenLogprobs | None] = [None] * len(wanted)
    if not rows:
        return result
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)                   # [b]
    logp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)               # [b, V]
    chosen = logp.gather(1, tokens.index_select(0, index)[:, None]).squeeze(1)           # [b]
    k = min(max(wanted[i] for i in rows), logp.shape[1])
    top_logp, top_ids = torch.topk(logp, k, dim=-1)                                       # [b, k] each
    packed = torch.cat([chosen[:, None], top_logp], dim=1).double()                     # [b, 1 + k]
    packed = torch.cat([packed, top_ids.double()], dim=1).tolist()                       # [b, 1 + 2k]: one copy
    for j, i in enumerate(rows):
        n = wanted[i]
        row = packed[j]                                   # ids are exact in float64 (vocabularies < 2**53)
        result[i] = TokenLogprobs(row[0], tuple((int(t), lp) for t, lp in zip(row[1 + k:1 + k + n], row[1:1 + n])))
    return result
