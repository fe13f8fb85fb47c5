"""Typed results of the client's calls (plain dataclasses; no protobuf types leak out)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class Usage:
    """Token counts of one request; ``total_tokens`` is their sum (computed, included in ``asdict``)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total_tokens", self.prompt_tokens + self.completion_tokens)


@dataclass(frozen=True)
class GenerateResult:
    """A finished generation: every generated token and its text.

    ``finish_reason`` is ``"stop"`` (end-of-sequence, a stop token or a stop string: the text ends
    before the stop string, the tokens with the one that completed it), ``"length"`` (``max_tokens``
    or the context limit) or ``"abort"`` (aborted by :meth:`Client.abort`). ``logprobs`` is None
    unless ``logprobs=`` was asked; then one per token of ``token_ids``.
    """

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    usage: Usage
    logprobs: list[TokenLogprobs] | None = None


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities around one generated token, under the model's raw distribution (log_softmax of
    its logits, before temperature, top-k and top-p)."""

    token_id: int
    logprob: float                                # of this token
    top: list[tuple[int, float]]                  # (token id, logprob) of the most probable tokens, best first


@dataclass(frozen=True)
class StreamChunk:
    """Tokens new since the previous chunk, and their text (the server holds back incomplete UTF-8 and
    what may be the start of a stop string); with ``logprobs=`` asked, one :class:`TokenLogprobs`
    per token."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs] = field(default_factory=list)


@dataclass(frozen=True)
class ModelInfo:
    """What the cluster serves and how it is laid out."""

    request_id: str
    model: str
    vocab_size: int
    max_context: int
    kv_cache_bytes_per_token: int
    attention_replicas: int
    expert_shards: int
    placement_version: int
    eos_token_ids: list[int] = field(default_factory=list)
