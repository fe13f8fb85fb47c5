"""AttentionService: the router's view of one attention/prefill replica, served by ``grpc.aio``.

Every call is a coroutine on the server's event loop, so the replica's many long ``Submit`` streams
cost no thread each: the engine loop's courier puts each step's outputs on the event loop and the
streams send them. ``Submit`` streams a request's token events until it finishes; a cancelled call
(client gone, deadline passed) aborts the request on the engine, which frees its KV blocks at once.
"""
from __future__ import annotations

import asyncio

import grpc

from services.attention.engine_loop import EngineLoop, StepError
from services.engine.engine import RequestOutput
from services.engine.sampling import InvalidParam
from services.params import FINISH_REASONS, sampling_from_proto
from services.proto import attention_pb2, attention_pb2_grpc, generation_pb2

SERVICE_NAME = "epserve.v1.AttentionService"


class LoopOutputs:
    """A request's outputs as an ``asyncio.Queue`` on ``loop``, fed from the engine's courier thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, item: RequestOutput | StepError) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AttentionServicer(attention_pb2_grpc.AttentionServiceServicer):
    def __init__(self, loop: EngineLoop, replica_id: str, placement_version: int):
        self.loop = loop
        self.replica_id = replica_id
        self.placement_version = placement_version

    async def Submit(self, request, context):
        if self.loop.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"replica {self.replica_id} is draining")
        outputs = LoopOutputs(asyncio.get_running_loop())
        try:
            params = sampling_from_proto(request.sampling, seed=request.seed)
            self.loop.submit(request.request_id, list(request.prompt_ids), params, outputs, list(request.emitted_ids))
        except InvalidParam as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        finished = False
        try:
            while not finished:
                item = await outputs.queue.get()
                if isinstance(item, StepError):
                    finished = True                       # the engine already dropped the request
                    await context.abort(grpc.StatusCode.INTERNAL, item.message)
                finished = item.finished
                yield _event(item)
        finally:
            if not finished:                              # cancelled: the caller went away or its deadline passed
                self.loop.abort(request.request_id)

    async def Abort(self, request, context):
        found = self.loop.abort(request.request_id)
        return generation_pb2.AbortResponse(request_id=request.request_id, found=found)

    async def Drain(self, request, context):
        """Stop admitting; wait (up to the call's deadline) until running requests have finished."""
        self.loop.draining = True
        while self.loop.in_flight():
            remaining = context.time_remaining()
            if remaining is not None and remaining < 0.2:
                break
            await asyncio.sleep(0.1)
        return attention_pb2.DrainResponse(request_id=request.request_id, remaining=self.loop.in_flight())

    async def GetLoad(self, request, context):
        load = self.loop.load()
        return attention_pb2.LoadReport(
            request_id=request.request_id, replica_id=self.replica_id, kv_blocks_total=load["kv_blocks_total"],
            kv_blocks_used=load["kv_blocks_used"], running=load["running"], waiting=load["waiting"],
            placement_version=self.placement_version, draining=load["draining"])


def _event(output: RequestOutput) -> attention_pb2.TokenEvent:
    return attention_pb2.TokenEvent(
        request_id=output.request_id, token_ids=output.new_token_ids, finished=output.finished,
        finish_reason=FINISH_REASONS.get(output.finish_reason, 0),
        usage=generation_pb2.Usage(prompt_tokens=output.prompt_tokens, completion_tokens=output.completion_tokens))


def add_to_server(servicer: AttentionServicer):
    return lambda server: attention_pb2_grpc.add_AttentionServiceServicer_to_server(servicer, server)
