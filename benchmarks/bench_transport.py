"""The expert data path alone: round trip of one dispatch + combine per transport, by batch size.

    python -m benchmarks.bench_transport [--hidden 7168] [--top-k 8] [--tokens 1,16,128,1024,4096]
                                         [--transports grpc,local] [--iters 20]

A separate process plays the expert shard with an echo ``serve`` (the output is the hidden rows,
in the model dtype), behind a gRPC ``ExpertService``, a local-transport and a nixl server, so only
the transport is timed: this process sends an ``ExpertBatch`` (hidden [T, D] bfloat16, top-k int32
slots and float32 weights) and waits for the [T, D] answer. Prints the median round trip, half of
it as the one-way latency, and GB/s of the bytes moved both ways (tensor bytes, no framing).
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import torch

from benchmarks.common import print_table
from epserve.services.cluster.expert_batch import ExpertBatch, from_request
from epserve.services.cluster.grpc_server import start_grpc_server
from epserve.services.cluster import nixl_transport
from epserve.services.cluster.local_transport import LocalExpertServer, slot_bytes_for
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


def serve_echo(endpoints, stop) -> None:
    """The shard process: both servers, their endpoint on ``endpoints``, until ``stop`` is set."""
    torch.set_num_threads(1)
    grpc_server = start_grpc_server(lambda s: expert_pb2_grpc.add_ExpertServiceServicer_to_server(EchoShard(), s),
                                    [SERVICE], max_message_bytes=1 << 30)
    data_servers = [LocalExpertServer(echo, "echo shard")]
    if nixl_transport.available():
        data_servers.append(nixl_transport.NixlExpertServer(echo, "echo shard"))
    endpoints.put(ShardEndpoint(grpc_server.address, data_servers[0].name, host_id(),
                                data_servers[1].name if len(data_servers) > 1 else None))
    stop.wait()
    for server in data_servers:
        server.close()
    grpc_server.stop(None)


def round_trips(transport: ExpertTransport, batch: ExpertBatch, iters: int) -> list[float]:
    transport.send(0, batch).result()                                     # warm-up (and connect)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        transport.send(0, batch).result()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", default="1,16,128,1024,4096")
    parser.add_argument("--transports", default="grpc,local,nixl" if nixl_transport.available() else "grpc,local")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    context = multiprocessing.get_context("spawn")
    endpoints, stop = context.Queue(), context.Event()
    shard = context.Process(target=serve_echo, args=(endpoints, stop), daemon=True)
    shard.start()
    endpoint = endpoints.get(timeout=120)
    rows = []
    try:
        for mode in args.transports.split(","):
            transport = ExpertTransport({0: endpoint}, mode=mode, max_message_bytes=1 << 30,
                                        local_slot_bytes=slot_bytes_for(max(tokens), args.hidden, args.top_k))
            try:
                for t in tokens:
                    batch = ExpertBatch(1, 1, torch.randn(t, args.hidden).bfloat16(), None,
                                        torch.zeros(t, args.top_k, dtype=torch.int32), torch.rand(t, args.top_k))
                    median = statistics.median(round_trips(transport, batch, args.iters))
                    moved = 2 * batch.hidden.nbytes + batch.topk_slots.nbytes + batch.topk_weights.nbytes
                    rows.append({"transport": mode, "tokens": t, "round trip ms": round(median * 1e3, 3),
                                 "one-way us": round(median * 1e6 / 2, 1), "GB/s": round(moved / median / 1e9, 3)})
            finally:
                transport.close()
    finally:
        stop.set()
        shard.join(30)
    print(f"hidden={args.hidden} top_k={args.top_k} bfloat16, echo shard in another process, "
          f"median of {args.iters} round trips")
    print_table(rows)


if __name__ == "__main__":
    main()
