"""The attention replica's gRPC service: a replica refuses what would overfill it, whichever router sends it; a
session's abort or end ends only its own run of a request id."""
import asyncio

import grpc
import pytest

from epserve.services.attention.engine_loop import EngineLoop
from epserve.services.attention.service import SERVICE_NAME, AttentionServicer, add_to_server
from epserve.services.cluster.grpc_server import start_aio_grpc_server
from epserve.services.engine.params import SamplingParams
from epserve.services.params import sampling_to_proto
from epserve.services.proto import attention_pb2, attention_pb2_grpc, generation_pb2
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


def test_an_abort_or_the_end_of_a_session_ends_only_its_own_run_of_an_id():
    """A request id aborted on one session (router) and submitted again on another: a later abort from the
    first session, naming its own (ended) run, and that session's end leave the second run alone; every event
    carries the run its submit named."""
    engine, _ = engine_with(lambda experts: experts)
    loop = EngineLoop(engine, step_retries=0).start()
    server = start_aio_grpc_server(add_to_server(AttentionServicer(loop, "r0", lambda: 1, max_in_flight=8)),
                                   [SERVICE_NAME])
    long = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)

    class Session:
        def __init__(self, channel):
            self.outgoing: asyncio.Queue = asyncio.Queue()
            self.events: list = []
            self.call = attention_pb2_grpc.AttentionServiceStub(channel).Session(self._send())
            self.reader = asyncio.ensure_future(self._read())

        async def _send(self):
            while True:
                yield await self.outgoing.get()

        async def _read(self):
            async for reply in self.call:
                self.events.extend(reply.events)

        def submit(self, run: int) -> None:
            self.outgoing.put_nowait(attention_pb2.SessionRequest(request_id="x", submit=attention_pb2.SubmitRequest(
                request_id="x", prompt_ids=PROMPTS[0], sampling=sampling_to_proto(long), seed=1, run=run)))

        def abort(self, run: int) -> None:
            self.outgoing.put_nowait(attention_pb2.SessionRequest(request_id="x", run=run,
                                                                  abort=generation_pb2.AbortRequest(request_id="x")))

        async def wait_for(self, check) -> None:
            for _ in range(3000):
                if check(self.events):
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"events so far: {self.events}")

    async def main():
        async with grpc.aio.insecure_channel(server.address) as channel:
            first, second = Session(channel), Session(channel)
            first.submit(run=1)
            await first.wait_for(lambda events: any(e.token_ids for e in events))
            first.abort(run=1)
            await first.wait_for(lambda events: any(e.finished for e in events))
            assert first.events[-1].finish_reason == generation_pb2.FINISH_REASON_ABORT and {e.run for e in first.events} == {1}
            second.submit(run=7)
            await second.wait_for(lambda events: any(e.token_ids for e in events))
            first.abort(run=1)                       # its run ended: this must not end the second one
            first.submit(run=2)                      # refused while the second runs: ALREADY_EXISTS, run 2
            await first.wait_for(lambda events: any(e.run == 2 for e in events))
            assert first.events[-1].error.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
            first.call.cancel()                      # the first router goes away
            await second.wait_for(lambda events: any(e.finished for e in events))
            last = second.events[-1]
            assert not last.HasField("error") and last.finish_reason == generation_pb2.FINISH_REASON_LENGTH
            assert sum(len(e.token_ids) for e in second.events) == 100 and {e.run for e in second.events} == {7}
            second.call.cancel()

    try:
        asyncio.run(main())
    finally:
        loop.stop()
        server.stop(None)
