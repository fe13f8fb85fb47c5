"""Cluster decode throughput vs the single-process engine, same model and prompts, same run.

    python -m benchmarks.bench_cluster [--model tiny] [--concurrency 1,8,32] [--new-tokens 64]
                                       [--attention 1] [--expert-shards 2] [--redundant-experts 2]

Starts ``epserve up`` (separate processes on loopback), sends ``concurrency`` greedy requests at
once through the SDK and counts generated tokens per second of wall time; then runs the same
requests through an in-process ``LLMEngine`` (all added at once). Prints both and their ratio.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from services.engine.engine import EngineConfig, LLMEngine
from services.engine.sampling import SamplingParams
from services.model.tiny import resolve_model


def cluster_tokens_per_s(endpoint: str, prompts: list[list[int]], new_tokens: int) -> float:
    from epserve_client import Client

    with Client(endpoint, timeout=600) as client, ThreadPoolExecutor(len(prompts)) as pool:
        client.generate(prompts[0], max_tokens=4, temperature=0)                   # warm-up
        start = time.perf_counter()
        results = list(pool.map(lambda p: client.generate(p, max_tokens=new_tokens, temperature=0, ignore_eos=True),
                                prompts))
        elapsed = time.perf_counter() - start
    return sum(len(r.token_ids) for r in results) / elapsed


def engine_tokens_per_s(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0))     # warm-up
    start = time.perf_counter()
    seqs = engine.generate(prompts, params)
    return sum(len(s.output_ids) for s in seqs) / (time.perf_counter() - start)


def start_cluster(args) -> subprocess.Popen:
    command = [sys.executable, "-m", "services.cli", "up", "--model", args.model, "--port", str(args.port),
               "--attention", str(args.attention), "--expert-shards", str(args.expert_shards),
               "--redundant-experts", str(args.redundant_experts), "--micro-batches", str(args.micro_batches)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    for line in process.stdout:
        if "serving at" in line:
            return process
    raise RuntimeError("epserve up did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--attention", type=int, default=1)
    parser.add_argument("--expert-shards", type=int, default=2)
    parser.add_argument("--redundant-experts", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--port", type=int, default=50599)
    args = parser.parse_args()
    path = resolve_model(args.model)
    engine = LLMEngine.from_path(path, EngineConfig(max_num_seqs=256, max_num_batched_tokens=2048))
    vocab = engine.model_config.vocab_size
    generator = torch.Generator().manual_seed(0)
    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = {c: torch.randint(3, vocab, (c, args.prompt_len), generator=generator).tolist() for c in levels}
    single = {c: engine_tokens_per_s(engine, prompts[c], args.new_tokens) for c in levels}
    del engine
    process = start_cluster(args)
    try:
        cluster = {c: cluster_tokens_per_s(f"127.0.0.1:{args.port}", prompts[c], args.new_tokens) for c in levels}
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    print(f"model={args.model} attention={args.attention} shards={args.expert_shards} "
          f"redundant={args.redundant_experts} micro_batches={args.micro_batches} new_tokens={args.new_tokens}")
    print(f"{'concurrency':>11} {'single-process tok/s':>21} {'cluster tok/s':>14} {'ratio':>6}")
    for c in levels:
        print(f"{c:>11} {single[c]:>21.1f} {cluster[c]:>14.1f} {cluster[c] / single[c]:>6.2f}")


if __name__ == "__main__":
    main()
