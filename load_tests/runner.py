"""How load is applied and timed: one code path for every target.

Requests are released at the arrival process's times (``request_rate``, ``burstiness``); with
``max_concurrency`` at most that many are in flight, later ones wait in a client-side queue (their
``queue_time``). Rate inf with a concurrency is a closed loop: each finished request lets the next
one go. Warm-up requests run first, at the same concurrency, and are not measured. A run sends at
most ``num_prompts`` requests and none after ``duration_s``; each request is abandoned (``TIMEOUT``)
after ``request_timeout_s``, which bounds the run.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from epserve.load_tests.arrivals import arrival_times
from epserve.load_tests.metrics import RequestRecord
from epserve.load_tests.progress import Progress
from epserve.load_tests.targets import Reply, Target, TargetError
from epserve.load_tests.workloads import RequestSpec


@dataclass(frozen=True)
class LoadConfig:
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    duration_s: float | None = None
    request_timeout_s: float = 300.0
    seed: int = 0


@dataclass
class RunOutput:
    records: list[RequestRecord]
    duration_s: float                 # from the first send to the end of the last request


async def measure(target: Target, spec: RequestSpec, index: int, seed: int, timeout_s: float,
                  start_time: float, queue_time: float) -> RequestRecord:
    """Sends one request and times every chunk that carries tokens."""
    record = RequestRecord(index, start_time, queue_time, spec.prompt_len, spec.output_len)
    reply = Reply()
    sent = time.perf_counter()

    async def consume() -> None:
        async for tokens in target.stream(spec, reply, seed):
            if tokens:
                record.chunk_times.append(time.perf_counter() - sent)
                record.chunk_tokens.append(tokens)

    try:
        await asyncio.wait_for(consume(), timeout_s)
        if not record.chunk_tokens:
            record.status, record.error = "NO_TOKENS", "the stream ended without a token"
    except TargetError as err:
        record.status, record.error = err.status, err.message
    except asyncio.TimeoutError:
        record.status, record.error = "TIMEOUT", f"not finished after {timeout_s:g} s"
    record.end = time.perf_counter() - sent
    record.prompt_len = reply.prompt_tokens or spec.prompt_len
    record.output_len = reply.completion_tokens if reply.completion_tokens is not None else sum(record.chunk_tokens)
    return record


async def warm_up(target: Target, specs: list[RequestSpec], config: LoadConfig) -> None:
    """Sends ``specs`` at the run's concurrency and forgets the results."""
    slots = asyncio.Semaphore(config.max_concurrency or max(1, len(specs)))

    async def one(i: int, spec: RequestSpec) -> None:
        async with slots:
            await measure(target, spec, i, config.seed + 1_000_000 + i, config.request_timeout_s, 0.0, 0.0)

    await asyncio.gather(*(one(i, s) for i, s in enumerate(specs)))


async def run_load(target: Target, specs: list[RequestSpec], config: LoadConfig, progress: Progress,
                   background: Callable[[float], Awaitable[None]] | None = None) -> RunOutput:
    """Runs the measured phase; ``background(t0)`` (e.g. a fault injection) runs alongside it."""
    rng = np.random.default_rng([config.seed, 1])             # a stream of its own, apart from the workload's
    offsets = arrival_times(len(specs), config.request_rate, config.burstiness, rng)
    slots = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else contextlib.nullcontext()
    t0 = time.perf_counter()
    side = asyncio.create_task(background(t0)) if background else None

    async def one(i: int, spec: RequestSpec, due: float) -> RequestRecord | None:
        async with slots:
            now = time.perf_counter() - t0
            if config.duration_s is not None and now >= config.duration_s:
                return None                             # its slot came after the run's time was up
            record = await measure(target, spec, i, config.seed + i, config.request_timeout_s, now, now - due)
        progress.update(record.success)
        return record

    tasks = []
    for i, (spec, due) in enumerate(zip(specs, offsets)):
        if config.duration_s is not None and due >= config.duration_s:
            break
        await asyncio.sleep(max(0.0, t0 + due - time.perf_counter()))
        tasks.append(asyncio.create_task(one(i, spec, float(due))))
    records = [r for r in await asyncio.gather(*tasks) if r is not None]
    duration = time.perf_counter() - t0
    if side is not None:
        if side.done():
            side.result()                               # surfaces an error of the background task
        else:
            side.cancel()
    progress.close()
    return RunOutput(records, duration)
