"""Conversions between the wire's SamplingParams / FinishReason / TokenLogprobs and the engine's."""
from __future__ import annotations

from epserve.services.engine.params import SamplingParams, TokenLogprobs
from epserve.services.proto import generation_pb2

FINISH_REASONS = {"stop": generation_pb2.FINISH_REASON_STOP, "length": generation_pb2.FINISH_REASON_LENGTH,
                  "abort": generation_pb2.FINISH_REASON_ABORT}
FINISH_REASON_NAMES = {v: k for k, v in FINISH_REASONS.items()}


def sampling_from_proto(msg: generation_pb2.SamplingParams, seed: int | None = None) -> SamplingParams:
    """Wire params -> engine params (unset optional fields take the engine defaults).

    ``seed`` (the router's resolved seed) overrides the message's own.
    """
    defaults = SamplingParams()
    return SamplingParams(
        max_tokens=msg.max_tokens,
        temperature=msg.temperature if msg.HasField("temperature") else defaults.temperature,
        top_p=msg.top_p if msg.HasField("top_p") else defaults.top_p,
        top_k=msg.top_k if msg.HasField("top_k") else defaults.top_k,
        seed=seed if seed is not None else (msg.seed if msg.HasField("seed") else None),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
    )


def sampling_to_proto(params: SamplingParams) -> generation_pb2.SamplingParams:
    msg = generation_pb2.SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature,
                                        top_p=params.top_p, top_k=params.top_k,
                                        stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos)
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    return msg


def logprobs_to_proto(logprobs: TokenLogprobs) -> generation_pb2.TokenLogprobs:
    return generation_pb2.TokenLogprobs(logprob=logprobs.logprob, top_token_ids=[t for t, _ in logprobs.top],
                                        top_logprobs=[lp for _, lp in logprobs.top])


def logprobs_to_log(logprobs: TokenLogprobs) -> list:
    """The token log's JSON-able entry: ``[logprob, [[token id, logprob], ...]]``."""
    return [logprobs.logprob, [list(pair) for pair in logprobs.top]]


def logprobs_from_log(entry: list) -> generation_pb2.TokenLogprobs:
    logprob, top = entry
    return logprobs_to_proto(TokenLogprobs(logprob, tuple((t, lp) for t, lp in top)))
