"""The measurements: one :class:`RequestRecord` per request, and the run's summary with vLLM's names.

Per successful request (times from the moment the request was sent):

- **TTFT**: arrival of the first chunk that carries a token.
- **E2EL**: arrival of the last token (as vLLM; the stream's end follows at once).
- **TPOT**: (E2EL - TTFT) / (output tokens - 1), the mean gap between tokens after the first;
  only for requests with 2+ tokens (vLLM's definition).
- **ITL**: one value per pair of consecutive tokens, so a request has output tokens - 1 of them. A
  chunk that carries n tokens is n token arrivals at its arrival time: the first of them gets the gap
  since the previous chunk and the other n - 1 get 0. Hence a request's ITLs sum to E2EL - TTFT and
  their mean is its TPOT. (vLLM appends one ITL per chunk; with one token per chunk, as epserve
  streams today, the two are the same.)

Statistics are over all values of all successful requests: mean, median, population std, and
percentiles interpolated linearly (numpy's default, as vLLM). Throughputs divide by the run's
duration. A request is *good* when it succeeded and meets every SLO given (a 1-token request's TPOT
counts as 0, as in vLLM); goodput is good requests per second.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 95, 99)
METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_NAMES = ("ttft", "tpot", "e2el")


@dataclass
class RequestRecord:
    index: int
    start_time: float                 # s from the start of the measured run to the moment it was sent
    queue_time: float                 # s it waited for a slot under --max-concurrency
    prompt_len: int                   # the server's count when it reported one, else the workload's
    requested_output_len: int         # max_tokens asked for
    output_len: int = 0               # tokens received (the server's count when it reported one)
    chunk_times: list[float] = field(default_factory=list)   # s from start_time to each chunk with tokens
    chunk_tokens: list[int] = field(default_factory=list)    # tokens in each of those chunks
    end: float = 0.0                  # s from start_time to the end of the stream or the failure
    status: str = "OK"                # OK, a gRPC status name, "HTTP 503", TIMEOUT, CONNECTION_ERROR, ...
    error: str = ""

    @property
    def success(self) -> bool:
        return self.status == "OK"

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] if self.success else None

    @property
    def e2el(self) -> float | None:
        return self.chunk_times[-1] if self.success else None

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_len < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.output_len - 1)

    @property
    def itls(self) -> list[float]:
        if not self.success:
            return []
        gaps = [0.0] * (self.chunk_tokens[0] - 1)
        for prev, now, n in zip(self.chunk_times, self.chunk_times[1:], self.chunk_tokens[1:]):
            gaps += [now - prev] + [0.0] * (n - 1)
        return gaps

    def meets(self, slo: dict[str, float]) -> bool:
        """Succeeded and within every SLO (milliseconds by metric name)."""
        if not self.success:
            return False
        values = {"ttft": self.ttft, "tpot": self.tpot or 0.0, "e2el": self.e2el}
        return all(values[name] * 1000 <= limit for name, limit in slo.items())


def parse_slo(text: str) -> dict[str, float]:
    """``ttft=500,tpot=50,e2el=2000`` (milliseconds) -> ``{"ttft": 500.0, ...}``."""
    slo = {}
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep or name not in SLO_NAMES:
            raise ValueError(f"--slo {text!r}: use NAME=MS pairs with NAME in {', '.join(SLO_NAMES)}")
        try:
            slo[name] = float(value)
        except ValueError:
            raise ValueError(f"--slo {text!r}: {value!r} is not a number of milliseconds") from None
        if slo[name] < 0:
            raise ValueError(f"--slo {text!r}: {name} must be >= 0")
    return slo


def stats_ms(name: str, values_s: list[float]) -> dict[str, float | None]:
    """``mean_/median_/std_/p50_/.../p99_{name}_ms`` of values in seconds; None where there are none."""
    keys = ["mean", "median", "std", *(f"p{p}" for p in PERCENTILES)]
    if not values_s:
        return {f"{k}_{name}_ms": None for k in keys}
    ms = np.asarray(values_s, dtype=float) * 1000
    values = [ms.mean(), np.median(ms), ms.std(), *np.percentile(ms, PERCENTILES)]
    return {f"{k}_{name}_ms": float(v) for k, v in zip(keys, values)}


def summarize(records: list[RequestRecord], duration_s: float, slo: dict[str, float]) -> dict:
    """The run's metrics under vLLM's result-file names, plus ``errors_by_status``."""
    ok = [r for r in records if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    summary = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) * per_s,
        "request_goodput": sum(r.meets(slo) for r in ok) * per_s if slo else None,
        "output_throughput": total_out * per_s,
        "total_token_throughput": (total_in + total_out) * per_s,
        "max_output_tokens_per_s": peak_tokens_per_s(ok),
        "max_concurrent_requests": peak_concurrency(ok),
        "errors_by_status": errors_by_status(records),
    }
    summary.update(stats_ms("ttft", [r.ttft for r in ok]))
    summary.update(stats_ms("tpot", [r.tpot for r in ok if r.tpot is not None]))
    summary.update(stats_ms("itl", [gap for r in ok for gap in r.itls]))
    summary.update(stats_ms("e2el", [r.e2el for r in ok]))
    return summary


def errors_by_status(records: list[RequestRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        if not r.success:
            counts[r.status] = counts.get(r.status, 0) + 1
    return dict(sorted(counts.items()))


def peak_tokens_per_s(records: list[RequestRecord]) -> float:
    """Most output tokens that arrived within one 1-second bucket of the run (vLLM's peak)."""
    buckets: dict[int, int] = {}
    for r in records:
        for t, n in zip(r.chunk_times, r.chunk_tokens):
            second = int(r.start_time + t)
            buckets[second] = buckets.get(second, 0) + n
    return float(max(buckets.values(), default=0))


def peak_concurrency(records: list[RequestRecord]) -> int:
    """Most requests in flight at once, each over [sent, last token)."""
    events = sorted([(r.start_time, 1) for r in records] + [(r.start_time + r.chunk_times[-1], -1) for r in records])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def token_rate_bins(records: list[RequestRecord], edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per bin between ``edges`` (s from the run's start): output tokens per second of the requests
    that succeeded, and failures per second (counted at the time each request failed)."""
    widths = np.diff(edges)
    tokens = np.zeros(len(widths))
    failures = np.zeros(len(widths))
    for r in records:
        if r.success:
            times = r.start_time + np.asarray(r.chunk_times)
            tokens += np.histogram(times, edges, weights=np.asarray(r.chunk_tokens, dtype=float))[0]
        else:
            failures += np.histogram([r.start_time + r.end], edges)[0]
    return tokens / widths, failures / widths
