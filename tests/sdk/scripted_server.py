"""A scripted ``GenerationService`` on a free loopback port, for testing the SDK against real gRPC.

It "generates" tokens 100, 101, ... (text ``<100><101>...``; with ``sampling.logprobs`` = k, token t
has logprob -t/1024 and the k alternatives t, t+1, ... of logprobs -t/1024, -(t+1)/1024, ...) in
chunks, records every call with its
request and metadata, and misbehaves as its :class:`Script` says: fail the first calls with
UNAVAILABLE, sleep, send an in-stream ``error``, or fail after the first chunk; a call with
``resume_from`` streams the tokens after that many.
"""
from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from epserve.services.proto import generation_pb2 as pb
from epserve.services.proto import generation_pb2_grpc as pb_grpc

MODEL_INFO = pb.ModelInfo(model="tiny", vocab_size=512, max_context=256, kv_cache_bytes_per_token=2304,
                          attention_replicas=2, expert_shards=4, placement_version=3, eos_token_ids=[1, 2])


@dataclass
class Script:
    """How the server behaves; tests set fields before calling."""

    fail_first: int = 0                 # this many calls (of any method) fail with UNAVAILABLE, nothing sent
    delay: float = 0.0                  # seconds to wait before answering (ends early if the call is cancelled)
    chunk_size: int = 2
    chunk_delay: float = 0.0            # seconds between chunks
    stream_error: tuple[grpc.StatusCode, str] | None = None  # sent as an `error` message after the first chunk
    status_after_first_chunk: tuple[grpc.StatusCode, str] | None = None  # gRPC status after the first chunk
    broken_streams: int = 1             # of the first this many Generate calls (the later ones go through)
    running: set[str] = field(default_factory=lambda: {"running-1"})  # ids that Abort finds


@dataclass
class Call:
    method: str
    request: object
    metadata: dict[str, str]
    ended: threading.Event = field(default_factory=threading.Event)  # set when the RPC terminates


class ScriptedServicer(pb_grpc.GenerationServiceServicer):
    def __init__(self) -> None:
        self.script = Script()
        self.calls: list[Call] = []

    def Generate(self, request, context):
        n = self._begin("Generate", request, context)
        _validate(request, context)
        request_id = request.request_id or f"srv-{n}"
        tokens, reason = _generated(request.sampling)
        breaks = len(self.calls_of("Generate")) <= self.script.broken_streams
        size = self.script.chunk_size
        for start in range(request.resume_from, len(tokens), size):     # a resumed call: after what was received
            part = tokens[start:start + size]
            yield pb.GenerateResponse(request_id=request_id, chunk=pb.Chunk(token_ids=part, text=_text(part),
                                                                            logprobs=_logprobs(part, request.sampling)))
            first = start == request.resume_from
            if first and self.script.stream_error:
                code, message = self.script.stream_error
                yield pb.GenerateResponse(request_id=request_id, error=pb.Error(code=code.value[0], message=message))
                return
            if first and breaks and self.script.status_after_first_chunk:
                context.abort(*self.script.status_after_first_chunk)
            _sleep(context, self.script.chunk_delay)
        prompt_tokens = len(request.token_ids.ids) if request.HasField("token_ids") else len(request.text.encode())
        usage = pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=len(tokens))
        complete = pb.Complete(finish_reason=reason, usage=usage, token_ids=tokens, text=_text(tokens))
        yield pb.GenerateResponse(request_id=request_id, complete=complete)

    def GetModelInfo(self, request, context):
        self._begin("GetModelInfo", request, context)
        info = pb.ModelInfo()
        info.CopyFrom(MODEL_INFO)
        info.request_id = request.request_id
        return info

    def Abort(self, request, context):
        self._begin("Abort", request, context)
        return pb.AbortResponse(request_id=request.request_id, found=request.request_id in self.script.running)

    def calls_of(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    def _begin(self, method: str, request, context) -> int:
        """Records the call, plays the scripted outage and delay; returns the call's number (from 1)."""
        call = Call(method, request, dict(context.invocation_metadata()))
        context.add_callback(call.ended.set)
        self.calls.append(call)
        n = len(self.calls)
        if n <= self.script.fail_first:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"scripted outage {n}")
        _sleep(context, self.script.delay)
        return n


def _sleep(context, seconds: float) -> None:
    """Sleeps, but returns as soon as the call is cancelled or past its deadline."""
    end = time.monotonic() + seconds
    while context.is_active() and time.monotonic() < end:
        time.sleep(0.01)


def _validate(request, context) -> None:
    sampling = request.sampling
    if request.WhichOneof("input") is None:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "input: one of text or token_ids is required")
    if sampling.max_tokens < 1:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sampling.max_tokens must be >= 1, got {sampling.max_tokens}")
    if sampling.HasField("top_p") and not 0 < sampling.top_p <= 1:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sampling.top_p must be in (0, 1], got {sampling.top_p:g}")


def _generated(sampling) -> tuple[list[int], int]:
    tokens = []
    for token in range(100, 100 + sampling.max_tokens):
        tokens.append(token)
        if token in sampling.stop_token_ids:
            return tokens, pb.FINISH_REASON_STOP
    return tokens, pb.FINISH_REASON_LENGTH


def _logprobs(tokens, sampling) -> list[pb.TokenLogprobs]:
    if not sampling.HasField("logprobs"):
        return []
    top = range(sampling.logprobs)
    return [pb.TokenLogprobs(logprob=-t / 1024, top_token_ids=[t + i for i in top],
                             top_logprobs=[-(t + i) / 1024 for i in top]) for t in tokens]   # exact in float32


def _text(tokens) -> str:
    return "".join(f"<{t}>" for t in tokens)


class ScriptedServer:
    """The servicer served on ``127.0.0.1:<port>`` (0: a free one; TLS when ``credentials`` are given)."""

    def __init__(self, credentials: grpc.ServerCredentials | None = None, port: int = 0):
        self.servicer = ScriptedServicer()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_GenerationServiceServicer_to_server(self.servicer, self._server)
        if credentials is None:
            self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        else:
            self.port = self._server.add_secure_port(f"127.0.0.1:{port}", credentials)
        self.target = f"127.0.0.1:{self.port}"
        self._server.start()

    @property
    def script(self) -> Script:
        return self.servicer.script

    def stop(self) -> None:
        assert self._server.stop(grace=None).wait(timeout=30), "the scripted server did not stop in 30 s"
