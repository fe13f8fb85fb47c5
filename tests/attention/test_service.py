"""The attention replica's gRPC service: a replica refuses what would overfill it, whichever router sends it."""
import asyncio

import grpc
import pytest

from epserve.services.attention.engine_loop import EngineLoop
from epserve.services.attention.service import SERVICE_NAME, AttentionServicer, add_to_server
from epserve.services.cluster.grpc_server import start_aio_grpc_server
from epserve.services.params import sampling_to_proto
from epserve.services.proto import attention_pb2, attention_pb2_grpc
from tests.attention.test_engine_loop import PARAMS, PROMPTS, BlockingExperts, engine_with

pytestmark = pytest.mark.integration


def test_a_full_replica_refuses_with_resource_exhausted_across_sessions():
    """Two sessions (two routers) fill a replica allowed 2 requests in flight; the third is refused, and
    once the running ones finish a new one is taken again."""
    engine, blocking = engine_with(BlockingExperts)
    loop = EngineLoop(engine, step_retries=0).start()
    servicer = AttentionServicer(loop, "r0", lambda: 1, max_in_flight=2)
    server = start_aio_grpc_server(add_to_server(servicer), [SERVICE_NAME])

    def submit(request_id: str) -> attention_pb2.SessionRequest:
        return attention_pb2.SessionRequest(request_id=request_id, submit=attention_pb2.SubmitRequest(
            request_id=request_id, prompt_ids=PROMPTS[0], sampling=sampling_to_proto(PARAMS), seed=1))

    async def session(channel, requests: list[str], events: list, done: asyncio.Event):
        queue: asyncio.Queue = asyncio.Queue()
        for request_id in requests:
            queue.put_nowait(submit(request_id))

        async def outgoing():
            while True:
                yield await queue.get()

        call = attention_pb2_grpc.AttentionServiceStub(channel).Session(outgoing())
        async for reply in call:
            events.extend(reply.events)
            if done.is_set() or sum(e.finished for e in events) >= len(requests):
                call.cancel()
                return

    async def main():
        async with grpc.aio.insecure_channel(server.address) as channel:
            first, second, done = [], [], asyncio.Event()
            one = asyncio.ensure_future(session(channel, ["a", "b"], first, done))
            while loop.in_flight() < 2:
                await asyncio.sleep(0.01)
            await session(channel, ["c"], second, done)                  # another router, the replica full
            (refused,) = second
            assert refused.finished and refused.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert "r0 is full" in refused.error.message
            blocking.release.set()
            await asyncio.wait_for(one, 60)
            assert sorted(e.request_id for e in first if e.finished and not e.HasField("error")) == ["a", "b"]
            later = []
            await session(channel, ["d"], later, done)
            assert any(e.finished and not e.HasField("error") for e in later)

    try:
        asyncio.run(main())
    finally:
        blocking.release.set()
        loop.stop()
        server.stop(None)
