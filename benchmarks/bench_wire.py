"""Expert wire bytes per token per MoE layer, measured through real shard servers, against the ideal.

    python -m benchmarks.bench_wire [--model tiny|DIR] [--shards 2] [--redundant 2] [--batch 32] [--steps 16]

Runs the model through ``RemoteExperts`` with ``--shards`` ExpertShards in this process, each
behind a gRPC server on loopback and a local-transport server, for each transport (``grpc``,
``local``) and wire dtype: ``model`` (activations in the model dtype, bfloat16 by default) and
``fp8`` (e4m3 + 1x128 float32 scales). Prefill runs first; only ``--steps`` decode steps of
``--batch`` sequences are counted. Bytes are what the transport moved (gRPC: serialised messages,
tensors + routing + protobuf framing, HTTP/2 framing excluded; local: tensors + a fixed header),
per token per MoE layer:

- dispatch ideal per (token, shard) touched: hidden x 1 B + ceil(hidden/128) x 4 B scales (FP8),
  hidden x 2 B (BF16); combine ideal: hidden x 2 B per (token, shard) touched. The per-token
  ideal multiplies by the measured shards touched per token. The rest is routing: k int32 slots +
  k float32 weights per (token, shard), and framing.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

from benchmarks.common import print_table, write_csv
from epserve.kernels.fp8 import FP8_BLOCK
from epserve.services.attention.remote_experts import RemoteExperts
from epserve.services.cluster.grpc_server import start_grpc_server
from epserve.services.cluster.placement import build_placement
from epserve.services.cluster import nixl_transport
from epserve.services.cluster.local_transport import LocalExpertServer, slot_bytes_for
from epserve.services.cluster.transport import ExpertTransport, ShardEndpoint, host_id
from epserve.services.engine.engine import EngineConfig, LLMEngine
from epserve.services.engine.params import SamplingParams
from epserve.services.expert.shard import ExpertShard
from epserve.services.model.config import ModelConfig
from epserve.services.model.tiny import resolve_model
from epserve.services.proto import expert_pb2_grpc

SERVICE = "epserve.v1.ExpertService"


@contextlib.contextmanager
def local_shards(path, placement, dtype: torch.dtype):
    """One ExpertShard per shard with a gRPC, a local-transport and (where installed) a nixl server;
    yields shard id -> endpoint."""
    shards, servers, locals_, nixls = [], [], [], []
    try:
        for shard_id in range(placement.num_shards):
            shards.append(ExpertShard(path, shard_id, placement, dtype=dtype))
            servers.append(start_grpc_server(
                lambda server, s=shards[-1]: expert_pb2_grpc.add_ExpertServiceServicer_to_server(s, server), [SERVICE]))
            locals_.append(LocalExpertServer(shards[-1].serve, f"expert shard {shard_id}"))
            if nixl_transport.available():
                nixls.append(nixl_transport.NixlExpertServer(shards[-1].serve, f"expert shard {shard_id}"))
        yield {i: ShardEndpoint(server.address, locals_[i].name, host_id(), nixls[i].name if nixls else None)
               for i, server in enumerate(servers)}
    finally:
        for data_server in locals_ + nixls:
            data_server.close()
        for server in servers:
            server.stop(None)
        for shard in shards:
            shard.close()


def decode_steps(engine: LLMEngine, prompts: list[list[int]], steps: int, backend: RemoteExperts) -> float:
    """Prefill every prompt, reset the counters, run ``steps`` decode steps; returns decode tokens/s."""
    params = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"wire-{i}", prompt, params)
    first_tokens = 0
    while first_tokens < len(prompts):
        first_tokens += sum(len(o.new_token_ids) for o in engine.step())
    backend.stats.reset()
    backend.transport.stats.reset()
    emitted, start = 0, time.perf_counter()
    while engine.has_unfinished():
        emitted += sum(len(o.new_token_ids) for o in engine.step())
    return emitted / (time.perf_counter() - start)


def measure(path, placement, mode: str, wire: str, dtype: torch.dtype, prompts, steps: int) -> dict:
    config = ModelConfig.from_hf(path)
    d = config.hidden_size
    with local_shards(path, placement, dtype) as endpoints:
        transport = ExpertTransport(endpoints, mode=mode, local_slot_bytes=slot_bytes_for(4096, d, config.num_experts_per_tok))
        try:
            backend = RemoteExperts(placement, transport, wire_dtype=wire)
            engine = LLMEngine.from_path(path, EngineConfig(num_kv_blocks=4096, max_num_seqs=len(prompts), micro_batches=1),
                                         dtype=dtype, backend=backend)
            tok_s = decode_steps(engine, prompts, steps, backend)
        finally:
            transport.close()
    sent, received, _ = transport.stats.totals()
    tokens, shards_per_token = backend.stats.tokens, backend.stats.token_shards / backend.stats.tokens
    fp8 = wire == "fp8"
    ideal_dispatch = (d + -(-d // FP8_BLOCK) * 4 if fp8 else d * dtype.itemsize) * shards_per_token
    ideal_combine = d * dtype.itemsize * shards_per_token
    return {"transport": mode, "wire": "fp8" if fp8 else str(dtype).removeprefix("torch."),
            "shards/token": round(shards_per_token, 2),
            "dispatch B": round(sent / tokens), "dispatch ideal": round(ideal_dispatch),
            "dispatch ratio": round(sent / tokens / ideal_dispatch, 3),
            "combine B": round(received / tokens), "combine ideal": round(ideal_combine),
            "combine ratio": round(received / tokens / ideal_combine, 3),
            "decode tok/s": round(tok_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--redundant", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--transports", default="grpc,local,nixl" if nixl_transport.available() else "grpc,local", help="expert transports to measure")
    parser.add_argument("--csv", metavar="PATH", help="also write the rows to this CSV file")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    path = resolve_model(args.model)
    config = ModelConfig.from_hf(path)
    placement = build_placement(config.n_routed_experts, args.shards, args.redundant, config.moe_layers)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, config.vocab_size, (args.batch, args.prompt_len), generator=generator).tolist()
    print(f"model={args.model} hidden={config.hidden_size} top-k={config.num_experts_per_tok} "
          f"shards={args.shards} redundant={args.redundant} batch={args.batch} decode steps={args.steps}; "
          f"bytes per token per MoE layer")
    rows = [measure(path, placement, mode, wire, dtype, prompts, args.steps)
            for mode in args.transports.split(",") for wire in ("model", "fp8")]
    print_table(rows)
    if args.csv:
        write_csv(args.csv, rows)


if __name__ == "__main__":
    main()
