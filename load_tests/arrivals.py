"""When to send: the open-loop arrival process.

Gaps between requests are Gamma(shape=b, scale=1/(rate*b)) with burstiness b, as in ``vllm bench
serve``: the mean gap is 1/rate whatever b is, and the coefficient of variation of the gaps is
1/sqrt(b). b = 1 gives exponential gaps, a Poisson process; b < 1 is burstier, b > 1 more regular.
Unlike vLLM the gaps are not rescaled to make the total exactly n/rate: the process stays a true
renewal process, and a seed gives the same times.
"""
from __future__ import annotations

import math

import numpy as np


def arrival_times(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Send times (seconds from the start) of ``n`` requests; the first at 0, all at 0 if ``rate`` is inf."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"rate and burstiness must be > 0, got {rate} and {burstiness}")
    if math.isinf(rate) or n == 0:
        return np.zeros(n)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])
