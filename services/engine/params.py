"""Sampling parameters and their validation (no torch: the router validates them at the edge)."""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from numbers import Integral, Real

SEED_LIMIT = 2**63  # seeds live in [0, 2**63) so they fit a signed int64 everywhere
MAX_LOGPROBS = 20  # most alternatives per token a request may ask for (``SamplingParams.logprobs``)


class InvalidParam(ValueError):
    """A sampling parameter is out of range; ``field`` names it and ``str()`` starts with it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # in (0, 1]; 1 = disabled
    top_k: int = 0  # 0 = disabled
    seed: int | None = None  # None: the engine draws one at admission (see draw_seed)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k: each sampled token's logprob and the k most probable tokens'

    def __post_init__(self):
        # Accept any iterable (e.g. a list from JSON) but keep the dataclass hashable.
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def finish_reason(self, output_ids: list[int], eos_token_ids, context_full: bool = False) -> str | None:
        """Why a request that emitted ``output_ids`` (the last one just sampled) ends: "stop" (EOS unless
        ``ignore_eos``, or a stop token id), "length" (``max_tokens``, or ``context_full``); None: it goes on."""
        if output_ids and ((not self.ignore_eos and output_ids[-1] in eos_token_ids)
                           or output_ids[-1] in self.stop_token_ids):
            return "stop"
        if len(output_ids) >= self.max_tokens or context_full:
            return "length"
        return None

    def validate(self, *, vocab_size: int, max_new_tokens_allowed: int) -> None:
        """Raise ``InvalidParam(field, message)`` for the first out-of-range field."""
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= max_new_tokens_allowed:
            raise InvalidParam(
                "max_tokens", f"must be an integer in [1, {max_new_tokens_allowed}], got {self.max_tokens!r}"
            )
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidParam("temperature", f"must be finite and >= 0, got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidParam("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidParam("top_k", f"must be an integer >= 0 (0 = disabled), got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT):
            raise InvalidParam("seed", f"must be null or an integer in [0, 2**63), got {self.seed!r}")
        for token in self.stop_token_ids:
            if not _is_int(token) or not 0 <= token < vocab_size:
                raise InvalidParam("stop_token_ids", f"every id must be in [0, {vocab_size}), got {token!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InvalidParam("logprobs", f"must be null or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities around one sampled token (see ``engine.logprobs`` for which distribution)."""

    logprob: float                          # of the sampled token
    top: tuple[tuple[int, float], ...]      # (token id, logprob) of the most probable tokens, best first


def draw_seed() -> int:
    """A fresh random seed in [0, 2**63) for a request that did not give one."""
    return secrets.randbits(63)


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)
