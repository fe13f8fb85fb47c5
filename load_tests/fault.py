"""The fault scenario: kill one service of a local ``epserve up`` cluster at time t, then measure.

Services are found in the state file ``epserve up --state-file PATH`` keeps: ``expert:K`` (shard K),
``attention:K`` (replica ``attention-K``), ``router`` / ``router:K`` (``router-K``) and ``redis``.

**Recovery**: output tokens per second of the requests that succeeded, in bins of ``bin_s`` seconds
aligned on the kill. The *baseline* is the mean rate over the pre-fault bins within the second half
of [0, t) (the first half is ramp-up). Only bins that end before the last request was sent count
after the kill (later the load itself tails off). Throughput has *recovered* at the start of the first
post-fault bin that is back to ``threshold`` x baseline after the dip (the first bin below it);
``time_to_recover_s`` is that bin's start minus t (0 if it never dipped), null if no bin after the dip
gets back (not recovered within the run). "Back once" rather than "stays up": under Poisson load,
1 s bins swing by +-50% around the mean even without a fault.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass

import numpy as np

from epserve.load_tests.metrics import RequestRecord, errors_by_status, token_rate_bins
from epserve.services.up_state import find_service

_KINDS = ("expert", "attention", "router", "redis")


@dataclass(frozen=True)
class Fault:
    service: str          # expert:1, attention:0, router, redis
    at_s: float           # seconds after the measured run starts
    signal: str = "SIGKILL"

    @classmethod
    def parse(cls, text: str) -> Fault:
        service, sep, at = text.partition("@")
        kind, _, index = service.partition(":")
        if not sep or kind not in _KINDS or (index and not index.isdigit()):
            raise ValueError(f"--fault {text!r}: use SERVICE@SECONDS, SERVICE one of expert:K, attention:K, "
                             "router, redis")
        try:
            at_s = float(at.removesuffix("s"))
        except ValueError:
            raise ValueError(f"--fault {text!r}: {at!r} is not a number of seconds") from None
        return cls(service, at_s)


def service_pid(state: dict, service: str) -> int:
    """The pid of ``service`` (``expert:1``, ``attention:0``, ``router``, ``redis``) in an ``epserve up``
    state file's contents (``epserve up --state-file PATH``; ``epserve.services.up_state``)."""
    kind, _, index = service.partition(":")
    index = index or "0"
    service_id = {"expert": index, "attention": f"attention-{index}", "router": f"router-{index}", "redis": "0"}[kind]
    return find_service(state, kind, service_id)["pid"]


async def inject(fault: Fault, pid: int, t0: float, log: dict) -> None:
    """Sleeps until ``t0 + fault.at_s`` (perf_counter time), signals ``pid`` and notes it in ``log``."""
    await asyncio.sleep(max(0.0, t0 + fault.at_s - time.perf_counter()))
    try:
        os.kill(pid, getattr(signal, fault.signal))
    except ProcessLookupError:
        log.update(pid=pid, not_killed=f"process {pid} had already exited")
        return
    log.update(pid=pid, killed_at_s=time.perf_counter() - t0)


def analyse(records: list[RequestRecord], killed_at_s: float, bin_s: float, threshold: float) -> dict:
    """Failures around the kill, the throughput timeline and the recovery (definitions above)."""
    t = killed_at_s
    last_send = max((r.start_time for r in records), default=t)
    end = max((r.start_time + r.end for r in records), default=t)
    edges = t + bin_s * np.arange(-np.floor(t / bin_s), np.ceil(max(end - t, 0) / bin_s) + 1)
    rate, failures = token_rate_bins(records, edges)
    starts = edges[:-1]
    pre = rate[(starts >= t / 2) & (edges[1:] <= t)]
    baseline = float(pre.mean()) if len(pre) else None
    post = rate[(starts >= t) & (edges[1:] <= last_send)]
    time_to_recover = None
    if baseline and len(post):
        below = np.nonzero(post < threshold * baseline)[0]
        if not len(below):
            time_to_recover = 0.0
        else:
            back = np.nonzero(post[below[0]:] >= threshold * baseline)[0]
            time_to_recover = float((below[0] + back[0]) * bin_s) if len(back) else None
    after = [r for r in records if r.start_time + r.end >= t and not r.success]
    in_flight = [r for r in records if r.start_time <= t < r.start_time + r.end]
    stalls = [next_chunk - t for r in in_flight
              if (next_chunk := next((r.start_time + c for c in r.chunk_times if r.start_time + c > t), None))]
    return {
        "failed_requests": sum(not r.success for r in records),
        "failed_after_fault": len(after),
        "errors_by_status_after_fault": errors_by_status(after),
        "in_flight_at_fault": len(in_flight),
        "in_flight_failed": sum(not r.success for r in in_flight),
        "stall_p50_s": float(np.median(stalls)) if stalls else None,      # fault to the next token of a
        "stall_max_s": float(max(stalls)) if stalls else None,            # request in flight at the fault
        "sent_after_fault": sum(r.start_time >= t for r in records),
        "succeeded_after_fault": sum(r.start_time >= t and r.success for r in records),
        "baseline_output_tokens_per_s": baseline,
        "min_output_tokens_per_s_after": float(post.min()) if len(post) else None,
        "recovery_threshold": threshold,
        "recovered": None if not baseline or not len(post) else time_to_recover is not None,
        "time_to_recover_s": time_to_recover,
        "timeline": {"bin_s": bin_s, "bin_start_s": starts.round(6).tolist(),
                     "output_tokens_per_s": rate.round(3).tolist(), "failures_per_s": failures.round(3).tolist()},
    }
