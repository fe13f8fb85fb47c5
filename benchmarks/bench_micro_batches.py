"""Decode step time of one attention engine over remote expert shards, by micro-batch count.

    python -m benchmarks.bench_micro_batches [--model tiny] [--seqs 32,64,128] [--micro-batches 1,2]

Starts an embedded Redis and ``--expert-shards`` ``epserve serve expert`` processes (one OpenMP
thread each, as ``epserve up`` runs them), then, in this process, an ``LLMEngine`` whose routed
experts are those shards (no router, no streaming: the engine's step alone). For each batch size
it prefills that many 16-token prompts and times ``--steps`` decode steps, once per micro-batch
count (``micro_batch_min_tokens`` 1, so the split always happens). This is what the attention
service's ``--micro-batch-min-tokens`` default rests on. Beside the step it prints the mean wall
time of one ``dispatch`` and one ``combine`` (per MoE layer and micro-batch; the shared expert runs
between the two): where the shards' round trips go.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import redis
import torch

from benchmarks.common import print_table
from epserve.services.attention.remote_experts import RemoteExperts
from epserve.services.cluster.keys import Keys
from epserve.services.cluster.redis_server import EmbeddedRedis
from epserve.services.cluster.registry import Registry
from epserve.services.cluster.state import PlacementStore
from epserve.services.cluster.transport import ExpertTransport, ShardEndpoint
from epserve.services.config import TRANSPORTS, AttentionConfig
from epserve.services.engine.engine import EngineConfig, LLMEngine
from epserve.services.engine.params import SamplingParams
from epserve.services.model.tiny import resolve_model

CLUSTER = "bench-micro-batches"


def start_shards(args, redis_url: str) -> list[subprocess.Popen]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "epserve.services.cli", "serve", "expert", "--redis", redis_url, "--cluster", CLUSTER,
               "--model", args.model, "--expert-shards", str(args.expert_shards),
               "--redundant-experts", str(args.redundant_experts), "--dtype", "float32"]
    return [subprocess.Popen(command + ["--shard-id", str(shard)], env=env, stdin=subprocess.DEVNULL)
            for shard in range(args.expert_shards)]


class PhaseTimes:
    """Wall time spent in a backend's ``dispatch`` and ``combine``, summed from the last ``reset``."""

    def __init__(self, backend: RemoteExperts):
        self.seconds = {"dispatch": 0.0, "combine": 0.0}
        self.calls = 0
        for name in self.seconds:                       # instance attributes shadow the methods
            setattr(backend, name, self._timed(name, getattr(backend, name)))

    def _timed(self, name: str, method):
        def timed(*args):
            start = time.perf_counter()
            try:
                return method(*args)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls += name == "dispatch"
        return timed

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.calls = 0

    def us_per_call(self) -> dict[str, float]:
        return {f"{name}_us": round(1e6 * s / max(self.calls, 1), 1) for name, s in self.seconds.items()}


def step_ms(path, backend: RemoteExperts, seqs: int, micro_batches: int, steps: int, phases: PhaseTimes) -> float:
    """Mean wall ms of one decode step of ``seqs`` sequences (``phases`` reset at its start)."""
    config = EngineConfig(max_num_seqs=seqs, max_num_batched_tokens=4096, micro_batches=micro_batches,
                          micro_batch_min_tokens=1)
    engine = LLMEngine.from_path(path, config, dtype=torch.float32, backend=backend)
    prompts = torch.randint(3, engine.model_config.vocab_size, (seqs, 16), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(prompts.tolist()):
        engine.add_request(f"r{i}", prompt, params)
    for _ in range(4):                                   # prefill and warm-up
        engine.step()
    phases.reset()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seqs", default="32,64,128")
    parser.add_argument("--micro-batches", default="1,2")
    parser.add_argument("--expert-shards", type=int, default=2)
    parser.add_argument("--redundant-experts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--transport", default=AttentionConfig.transport, choices=TRANSPORTS)
    args = parser.parse_args()
    torch.set_num_threads(1)                             # as the attention service runs under `epserve up`
    path = resolve_model(args.model)
    with EmbeddedRedis() as server:
        shards = start_shards(args, server.url)
        try:
            client, keys = redis.Redis.from_url(server.url), Keys(CLUSTER)
            found = Registry(client, keys).wait_for("expert", args.expert_shards, timeout_s=300)
            transport = ExpertTransport({int(s.service_id): ShardEndpoint.from_service(s) for s in found},
                                        mode=args.transport)
            backend = RemoteExperts(PlacementStore(client, keys).current(), transport)
            phases = PhaseTimes(backend)
            rows = []
            for n in map(int, args.seqs.split(",")):
                for m in map(int, args.micro_batches.split(",")):
                    ms = step_ms(path, backend, n, m, args.steps, phases)
                    rows.append({"seqs": n, "micro_batches": m, "ms_per_step": round(ms, 2), **phases.us_per_call()})
            transport.close()
        finally:
            for shard in shards:
                shard.terminate()
                shard.wait(timeout=60)
    print(f"model={args.model} shards={args.expert_shards} redundant={args.redundant_experts} "
          f"transport={args.transport} steps={args.steps} (decode, wall ms per engine step, attention on one thread)")
    print_table(rows)


if __name__ == "__main__":
    main()
