"""Cluster decode throughput vs the single-process engine, same model and prompts, same run.

    python -m benchmarks.bench_cluster [--model tiny] [--concurrency 1,8,32] [--new-tokens 64]
                                       [--attention 1] [--expert-shards 2] [--redundant-experts 2]
                                       [--transport auto|grpc|local] [--device cuda]

Starts ``epserve up`` (separate processes on loopback), sends ``concurrency`` greedy requests at
once through the SDK (round after round, for at least ``--min-seconds``) and counts generated tokens
per second of wall time; then runs the same
requests through an in-process ``LLMEngine`` (all added at once) while every cluster process is
stopped (SIGSTOP), alternating the two ``--repeats`` times. Prints the medians, their ranges and
the ratio (both on ``--device``: the GPU when there is one, where ``local`` is CUDA IPC),
and where the cluster's CPU time went: CPU ms per generated token for each process (the load
client, router, attention replicas, expert shards, redis), read from /proc (pids from the state file).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from epserve.services.config import TRANSPORTS, AttentionConfig
from epserve.services.engine.engine import EngineConfig, LLMEngine
from epserve.services.engine.params import SamplingParams
from epserve.services.model.tiny import resolve_model
from epserve.services.model_service import default_device
from epserve.services.up_state import wait_ready

RESUME_S = 2.0      # after a pause: heartbeats re-register what expired in Redis (TTL 3 s) meanwhile


def cluster_tokens_per_s(endpoint: str, prompts: list[list[int]], new_tokens: int, roles: dict[int, str],
                         min_seconds: float) -> tuple[float, dict[str, float]]:
    """-> (tokens/s, CPU ms per generated token by process role), over rounds of ``prompts`` (all at once)
    until ``min_seconds`` have passed. The load is one asyncio client (``AsyncClient``, as the load-test
    harness uses) so that it takes little of the machine."""
    from epserve_client import AsyncClient

    async def run() -> tuple[float, dict[str, float]]:
        async with AsyncClient(endpoint, timeout=600) as client:
            await client.generate(prompts[0], max_tokens=4, temperature=0)            # warm-up
            cpu_before, start, tokens = cpu_seconds(roles), time.perf_counter(), 0
            while tokens == 0 or time.perf_counter() - start < min_seconds:
                results = await asyncio.gather(*[
                    client.generate(p, max_tokens=new_tokens, temperature=0, ignore_eos=True) for p in prompts])
                tokens += sum(len(r.token_ids) for r in results)
            elapsed, cpu_after = time.perf_counter() - start, cpu_seconds(roles)
        cpu_ms = {role: 1e3 * (cpu_after[role] - cpu_before.get(role, 0.0)) / tokens for role in cpu_after}
        return tokens / elapsed, cpu_ms

    return asyncio.run(run())


def cpu_seconds(roles: dict[int, str]) -> dict[str, float]:
    """CPU seconds (user + system) so far of this process and of each cluster process, by role."""
    tick = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for pid, role in {**roles, os.getpid(): "load client"}.items():
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        totals[role] = totals.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return totals


def engine_tokens_per_s(engine: LLMEngine, prompts: list[list[int]], new_tokens: int, min_seconds: float) -> float:
    """Tokens/s of the in-process engine over rounds of ``prompts`` (all at once) until ``min_seconds`` have passed."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0))     # warm-up
    start, tokens = time.perf_counter(), 0
    while tokens == 0 or time.perf_counter() - start < min_seconds:
        tokens += sum(len(s.output_ids) for s in engine.generate(prompts, params))
    return tokens / (time.perf_counter() - start)


def start_cluster(args, state_file: str) -> tuple[subprocess.Popen, dict[int, str]]:
    """``epserve up`` started and ready; -> (its process, pid -> role of every process of the cluster)."""
    command = [sys.executable, "-m", "epserve.services.cli", "up", "--model", args.model, "--port", str(args.port),
               "--http-port", str(args.port + 1),
               "--attention", str(args.attention), "--expert-shards", str(args.expert_shards),
               "--redundant-experts", str(args.redundant_experts), "--micro-batches", str(args.micro_batches),
               "--micro-batch-min-tokens", str(args.micro_batch_min_tokens), "--transport", args.transport,
               "--device", args.device, "--state-file", state_file]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    state = wait_ready(state_file, process, timeout_s=600)
    return process, {s["pid"]: s["kind"] for s in state["services"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--attention", type=int, default=1)
    parser.add_argument("--expert-shards", type=int, default=2)
    parser.add_argument("--redundant-experts", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=EngineConfig.micro_batches)
    parser.add_argument("--micro-batch-min-tokens", type=int, default=EngineConfig.micro_batch_min_tokens)
    parser.add_argument("--transport", default=AttentionConfig.transport, choices=TRANSPORTS,
                        help="attention -> expert data path (auto: local on one machine)")
    parser.add_argument("--device", help="where the cluster's services and the single-process engine run "
                                         "(default: as epserve up, the GPU if there is one)")
    parser.add_argument("--port", type=int, default=50599)
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each, alternating; medians reported")
    parser.add_argument("--min-seconds", type=float, default=2.0,
                        help="each measurement repeats its round of requests until this long has passed "
                             "(one 64-token round at c=1 is under a second: too short on a noisy machine)")
    args = parser.parse_args()
    args.device = default_device(args.device)
    path = resolve_model(args.model)
    # in-process experts: nothing to hide behind micro-batches, so one batch per step
    engine = LLMEngine.from_path(path, EngineConfig(max_num_seqs=256, max_num_batched_tokens=2048, micro_batches=1),
                                 device=args.device)
    generator = torch.Generator().manual_seed(0)
    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = {c: torch.randint(3, engine.model_config.vocab_size, (c, args.prompt_len), generator=generator).tolist()
               for c in levels}
    single, cluster = {c: [] for c in levels}, {c: [] for c in levels}
    process, roles = start_cluster(args, os.path.join(tempfile.mkdtemp(prefix="bench-cluster-"), "up.json"))
    try:
        for _ in range(args.repeats):           # alternate, so a drift of the machine hits both alike
            for c in levels:
                with paused([process.pid, *roles]):
                    single[c].append(engine_tokens_per_s(engine, prompts[c], args.new_tokens, args.min_seconds))
                cluster[c].append(cluster_tokens_per_s(f"127.0.0.1:{args.port}", prompts[c], args.new_tokens, roles,
                                                       args.min_seconds))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    report(args, levels, single, cluster)


@contextlib.contextmanager
def paused(pids: list[int]):
    """Every process of the cluster stopped (SIGSTOP) while the single process runs, so it runs
    alone (even an idle cluster's threads slow its two OpenMP threads); resumed after (SIGCONT)."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in reversed(pids):
            os.kill(pid, signal.SIGCONT)
        time.sleep(RESUME_S)


def report(args, levels: list[int], single: dict[int, list[float]], cluster: dict[int, list]) -> None:
    """Medians over the repeats, with ranges; the ratio is of the medians."""
    print(f"model={args.model} device={args.device} attention={args.attention} shards={args.expert_shards} "
          f"redundant={args.redundant_experts} transport={args.transport} micro_batches={args.micro_batches} (min {args.micro_batch_min_tokens} tokens) new_tokens={args.new_tokens} "
          f"repeats={args.repeats} of at least {args.min_seconds:g} s (medians)")
    print(f"{'concurrency':>11} {'single-process tok/s':>21} {'(range)':>15} {'cluster tok/s':>14} {'(range)':>15} "
          f"{'ratio':>6}")
    for c in levels:
        many = [t for t, _ in cluster[c]]
        print(f"{c:>11} {statistics.median(single[c]):>21.1f} {_span(single[c]):>15} "
              f"{statistics.median(many):>14.1f} {_span(many):>15} {statistics.median(many) / statistics.median(single[c]):>6.2f}")
    roles = sorted(cluster[levels[0]][0][1])
    print("cluster CPU ms per generated token, by process (2 cores = 2000 ms per second of wall time)")
    print(f"{'concurrency':>11} " + " ".join(f"{role:>12}" for role in roles))
    for c in levels:
        print(f"{c:>11} " + " ".join(f"{statistics.median(cpu.get(role, 0.0) for _, cpu in cluster[c]):>12.2f}"
                                     for role in roles))


def _span(values: list[float]) -> str:
    return f"{min(values):.0f}-{max(values):.0f}"


if __name__ == "__main__":
    main()
