"""The expert data path alone: round trip of one dispatch + combine per transport, by batch size.

    python -m benchmarks.bench_transport [--hidden 7168] [--top-k 8] [--tokens 1,16,128,1024,4096]
                                         [--transports grpc,local] [--iters 20] [--device cuda]
                                         [--experts 256 --shards 2]

A separate process plays the expert shard with an echo ``serve`` (the output is the hidden rows,
in the model dtype), behind a gRPC ``ExpertService``, a local-transport and a nixl server, so only
the transport is timed: this process sends an ``ExpertBatch`` (hidden [T, D] bfloat16, top-k int32
slots and float32 weights) and waits for the [T, D] answer. Prints the median round trip, half of
it as the one-way latency, and GB/s of the bytes moved both ways (tensor bytes, no framing).

``--device cuda``: the batch starts and the answer ends on the GPU, the shard process serves on
the GPU too (``local`` is then CUDA IPC; ``grpc`` and ``nixl`` go through host memory), and each
round trip ends with a device synchronisation. ``--experts E --shards S`` also times one MoE layer
the way an attention replica runs it: ``RemoteExperts`` dispatch + combine of T tokens routed to
random top-k of E experts placed on S echo shard processes (a DeepSeek-V3 layer: 256 experts, top-8),
over ``local``: routing, per-shard batches, the transport both ways and the weighted sum, without
the experts' own compute.
"""
from __future__ import annotations

import argparse
import multiprocessing

import torch

from benchmarks.common import print_table, time_ms
from epserve.services.attention.remote_experts import RemoteExperts
from epserve.services.cluster.expert_batch import ExpertBatch, from_request
from epserve.services.cluster.grpc_server import start_grpc_server
from epserve.services.cluster import nixl_transport
from epserve.services.cluster.local_transport import LocalExpertServer, slot_bytes_for
from epserve.services.cluster.placement import build_placement
from epserve.services.cluster.tensor_codec import to_proto
from epserve.services.cluster.transport import ExpertTransport, ShardEndpoint, host_id
from epserve.services.proto import expert_pb2, expert_pb2_grpc

SERVICE = "epserve.v1.ExpertService"


def echo(batch: ExpertBatch) -> torch.Tensor:
    return batch.hidden


class EchoShard(expert_pb2_grpc.ExpertServiceServicer):
    def Dispatch(self, request_iterator, context):
        for request in request_iterator:
            yield expert_pb2.CombineResponse(request_id=request.request_id, output=to_proto(echo(from_request(request))))


def serve_echo(endpoints, stop, cuda: bool = False) -> None:
    """The shard process: both servers, their endpoint on ``endpoints``, until ``stop`` is set."""
    torch.set_num_threads(1)
    if cuda:
        torch.cuda.init()
    grpc_server = start_grpc_server(lambda s: expert_pb2_grpc.add_ExpertServiceServicer_to_server(EchoShard(), s),
                                    [SERVICE], max_message_bytes=1 << 30)
    data_servers = [LocalExpertServer(echo, "echo shard")]
    if nixl_transport.available():
        data_servers.append(nixl_transport.NixlExpertServer(echo, "echo shard"))
    endpoints.put(ShardEndpoint(grpc_server.address, data_servers[0].name, host_id(),
                                data_servers[1].name if len(data_servers) > 1 else None, local_cuda=cuda))
    stop.wait()
    for server in data_servers:
        server.close()
    grpc_server.stop(None)


def wall_ms(fn, iters: int, cuda: bool) -> float:
    """Median wall ms of ``fn()`` after one warm-up call, each ended on a GPU by a device sync: the shard's
    work and the copy out run on other streams and processes, which events on this stream would not see."""
    call = (lambda: (fn(), torch.cuda.synchronize())) if cuda else fn
    return time_ms(call, torch.device("cpu"), iters)                      # the CPU path: perf_counter


def start_echo_shards(context, count: int, cuda: bool):
    """``count`` echo shard processes -> ({shard: endpoint}, stop event, processes)."""
    endpoints, stop = context.Queue(), context.Event()
    processes = [context.Process(target=serve_echo, args=(endpoints, stop, cuda), daemon=True) for _ in range(count)]
    for process in processes:
        process.start()
    return {shard: endpoints.get(timeout=120) for shard in range(count)}, stop, processes


def channel_rows(endpoint, args, tokens: list[int], device: torch.device) -> list[dict]:
    rows = []
    for mode in args.transports.split(","):
        transport = ExpertTransport({0: endpoint}, mode=mode, max_message_bytes=1 << 30, device=device,
                                    local_slot_bytes=slot_bytes_for(max(tokens), args.hidden, args.top_k))
        try:
            for t in tokens:
                batch = ExpertBatch(1, 1, torch.randn(t, args.hidden, device=device).bfloat16(), None,
                                    torch.zeros(t, args.top_k, dtype=torch.int32, device=device),
                                    torch.rand(t, args.top_k, device=device))
                median = wall_ms(lambda: transport.send(0, batch).result(), args.iters, device.type == "cuda") / 1e3
                moved = 2 * batch.hidden.nbytes + batch.topk_slots.nbytes + batch.topk_weights.nbytes
                rows.append({"transport": mode, "tokens": t, "round trip ms": round(median * 1e3, 3),
                             "one-way us": round(median * 1e6 / 2, 1), "GB/s": round(moved / median / 1e9, 3)})
        finally:
            transport.close()
    return rows


def layer_rows(endpoints, args, tokens: list[int], device: torch.device) -> list[dict]:
    """RemoteExperts dispatch + combine of one MoE layer over ``local`` to the echo shards."""
    placement = build_placement(args.experts, len(endpoints), 0, [1])
    transport = ExpertTransport(endpoints, mode="local", device=device,
                                local_slot_bytes=slot_bytes_for(max(tokens), args.hidden, args.top_k))
    remote = RemoteExperts(placement, transport)
    rows = []
    try:
        for t in tokens:
            x = torch.randn(t, args.hidden, device=device).bfloat16()
            ids = torch.stack([torch.randperm(args.experts, device=device)[:args.top_k] for _ in range(t)])
            weights = torch.rand(t, args.top_k, device=device)
            remote.stats.reset()
            median = wall_ms(lambda: remote.combine(remote.dispatch(1, x, weights, ids)), args.iters,
                             device.type == "cuda") / 1e3
            rows.append({"tokens": t, "dispatch + combine us": round(median * 1e6, 1),
                         "rows sent per token": round(remote.stats.token_shards / remote.stats.tokens, 2)})
    finally:
        transport.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", default="1,16,128,1024,4096")
    parser.add_argument("--transports", default="grpc,local,nixl" if nixl_transport.available() else "grpc,local")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="cpu", help="where the activations are: cpu or cuda")
    parser.add_argument("--experts", type=int, default=0, help="also time a MoE layer of this many experts")
    parser.add_argument("--shards", type=int, default=2, help="echo shard processes for --experts")
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    context = multiprocessing.get_context("spawn")
    endpoints, stop, processes = start_echo_shards(context, args.shards if args.experts else 1, cuda)
    try:
        rows = channel_rows(endpoints[0], args, tokens, device)
        layers = layer_rows(endpoints, args, tokens, device) if args.experts else []
    finally:
        stop.set()
        for process in processes:
            process.join(30)
    where = f"on {torch.cuda.get_device_name(device)}" if cuda else "on the CPU"
    print(f"hidden={args.hidden} top_k={args.top_k} bfloat16 {where}, echo shard in another process, "
          f"median of {args.iters} round trips")
    print_table(rows)
    if layers:
        print(f"\nOne MoE layer: RemoteExperts dispatch + combine over local, {args.experts} experts, top-{args.top_k}, "
              f"{args.shards} echo shard processes {where}, median of {args.iters}")
        print_table(layers)


if __name__ == "__main__":
    main()
