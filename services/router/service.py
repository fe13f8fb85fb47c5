"""GenerationService: the public API. Validate at the edge, admit, record, stream, cancel.

Served by ``grpc.aio``: every call is a coroutine on one event loop (a router relays many long
streams; a thread each would cost a wake-up per token each). What blocks (Redis, the admission
queue) runs on a thread pool. One ``Generate`` call: validate every field (INVALID_ARGUMENT naming
it) -> resolve the seed -> record the request in Redis (state, owner, prompt, params, seed) -> take
a replica from admission (queue when all are full, RESOURCE_EXHAUSTED beyond the bound) ->
submit it on the replica's shared ``Session`` stream and relay its token events (and logprobs) as
chunks, then one ``complete``; the text goes through a ``TextStream`` (incremental decoding, and the
request's stop strings: the first that appears ends it). A cancelled or expired client call aborts
the request on its replica, which frees its KV. A call with the id of an existing request (same
prompt and parameters) resumes it after ``resume_from`` tokens, from its Redis record and token log,
on any router: a client whose router died reconnects to another (or the restarted one) and its
stream goes on. A router relays each request id on one call: a newer call with the id (its client
reconnected before this router saw the old connection go) takes the request over, and the older call
is ended (ABORTED), leaving the request's record and its new run alone.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import grpc
import redis

from epserve.services import metrics
from epserve.services.cluster.cluster_tls import ClusterTls
from epserve.services.cluster.requests import DuplicateRequest, RequestRecord, RequestStore
from epserve.services.engine.params import InvalidParam, draw_seed
from epserve.services.engine.tokenizer import Tokenizer
from epserve.services.params import FINISH_REASON_NAMES, FINISH_REASONS, logprobs_from_log, sampling_to_proto
from epserve.services.proto import attention_pb2, generation_pb2, generation_pb2_grpc
from epserve.services.router.admission import Admission, NoReplicas, QueueFull, Replica
from epserve.services.router.auth import namespaced, tenant_of
from epserve.services.router.rate_limit import RateLimiter
from epserve.services.router.replica_session import ReplicaSessions, SessionBroken
from epserve.services.router.text_stream import TextStream
from epserve.services.router.validation import Limits, validate_request

log = logging.getLogger(__name__)
SERVICE_NAME = "epserve.v1.GenerationService"
LOG_CATCH_UP_S = 5.0         # a resume waits this long for a token log behind what its client received
RECORD_RETRY_S = 30.0        # a record update is retried this long while Redis is away
TAKE_OVER_WAIT_S = 5.0       # a call taking a request over waits this long for the older call to end
_ADMISSION_ERRORS = {QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED, NoReplicas: grpc.StatusCode.UNAVAILABLE,
                     TimeoutError: grpc.StatusCode.DEADLINE_EXCEEDED}


@dataclass(eq=False)
class _Call:
    """A ``Generate`` call relaying a request on this router (its task), until a newer call with its id
    supersedes it."""

    task: asyncio.Task
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    superseded: bool = False


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, *, model_name: str, tokenizer: Tokenizer, limits: Limits, admission: Admission,
                 requests: RequestStore, placement_summary: Callable[[], dict | None], model_info: dict,
                 resume_attempts: int, tenants: bool = False, rate_limiter: RateLimiter | None = None,
                 replica_tls: ClusterTls | None = None):
        self.model_name, self.tokenizer, self.limits = model_name, tokenizer, limits
        self.tenants, self.rate_limiter = tenants, rate_limiter   # API keys are identities; their limits
        self.admission, self.requests, self.model_info = admission, requests, model_info
        self.placement_summary = placement_summary      # -> {"placement_version", "expert_shards"} or None
        self.resume_attempts = resume_attempts          # resubmissions of one request after its replica went
        self.sessions = ReplicaSessions(tls=replica_tls)       # mutual TLS to the replicas, when set
        self._calls: dict[str, _Call] = {}                     # request id -> the call relaying it here
        # requests waiting in the admission queue each hold a thread; Redis calls need a few more
        self._pool = ThreadPoolExecutor(admission.max_queue + 16, thread_name_prefix="router-blocking")
        self._records: queue.SimpleQueue = queue.SimpleQueue()     # record updates, written in order by a
        threading.Thread(target=self._write_records, name="router-records", daemon=True).start()   # daemon

    async def _blocking(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _note(self, fn, *args):
        """A Redis read the request can do without (its answer None) when Redis is away."""
        try:
            return await self._blocking(fn, *args)
        except redis.RedisError as err:
            log.warning("%s%s: Redis is away (%s)", fn.__name__, args[:2], err)
            return None

    def _record(self, fn, *args) -> None:
        """A record update, off the token path: queued to one writer thread (in order), never awaited,
        so that a slow or absent Redis delays the record, not a token or a request's end; retried for
        ``RECORD_RETRY_S`` (a Redis restart) before it is given up."""
        def write():
            deadline = time.monotonic() + RECORD_RETRY_S
            while True:
                try:
                    return fn(*args)
                except redis.RedisError as err:
                    if time.monotonic() >= deadline:
                        log.warning("%s%s: Redis is away (%s); the record update is lost", fn.__name__, args[:2],
                                    err)
                        return None
                    time.sleep(0.25)

        self._records.put(write)

    def _write_records(self) -> None:
        while (write := self._records.get()) is not None:
            write()

    def _tenant(self, context) -> str:
        return tenant_of(context.invocation_metadata()) if self.tenants else ""

    async def Generate(self, request, context):
        started = time.monotonic()
        try:                                              # tokenising text may take a while: off the loop
            prompt, params = await self._blocking(validate_request, request, self.tokenizer, self.limits)
        except InvalidParam as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        tenant = self._tenant(context)
        external_id = request.request_id or uuid.uuid4().hex
        request_id = namespaced(tenant, external_id)
        if not request.request_id or await self._note(self.requests.get, request_id) is None:
            await self._check_rate(tenant, context)           # a resume (an existing id) is no new request
        call = _Call(asyncio.current_task())
        try:
            async with contextlib.aclosing(_metered(self._generate(request_id, request, prompt, params, context, call),
                                                    started)) as responses:
                async for response in responses:
                    response.request_id = external_id         # the caller's id, not the tenant's namespace
                    yield response
        except (asyncio.CancelledError, GeneratorExit) as stop:  # the client went away, or a newer call took over
            if self._calls.get(request_id) is call:       # it relays the request (_claim): its end aborts it
                self._record(self.requests.set_state, request_id, "aborted")     # a no-op once it has ended
            if call.superseded and isinstance(stop, asyncio.CancelledError):
                await context.abort(grpc.StatusCode.ABORTED, f"request_id: {external_id!r} was taken over by a "
                                                             f"newer call with this id")
            raise
        finally:                                      # after the relay's clean-up (its run aborted on the replica)
            call.ended.set()
            if self._calls.get(request_id) is call:
                del self._calls[request_id]

    async def _claim(self, request_id: str, call: _Call) -> None:
        """Make ``call`` the one relaying ``request_id`` here; an older call still relaying it is cancelled
        (superseded: it writes no record and aborts only its own run), and awaited a moment."""
        older = self._calls.get(request_id)
        self._calls[request_id] = call
        if older is not None and not older.ended.is_set():
            log.info("request %s: a newer call takes it over from the one relaying it here", request_id)
            older.superseded = True
            older.task.cancel()
            try:
                await asyncio.wait_for(older.ended.wait(), TAKE_OVER_WAIT_S)
            except asyncio.TimeoutError:
                log.warning("request %s: the call it was taken over from has not ended", request_id)

    async def _check_rate(self, tenant: str, context) -> None:
        wait = 0.0 if self.rate_limiter is None else await self._note(self.rate_limiter.wait_s, tenant) or 0.0
        if wait > 0:
            metrics.REFUSED.labels(grpc.StatusCode.RESOURCE_EXHAUSTED.name).inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, (
                f"rate limit: {self.rate_limiter.rate:g} requests/s per API key (bursts of "
                f"{self.rate_limiter.burst}); retry after {wait:.2f} s"))

    async def _generate(self, request_id: str, request, prompt: list[int], params, context, call: _Call):
        """A new request (recorded, admitted, relayed), or the resume of an existing one with this id."""
        seed = params.seed if params.seed is not None else draw_seed()
        try:
            await self._blocking(self.requests.create,
                                 RequestRecord(request_id, "queued", "", prompt, _params_dict(params, request), seed))
        except DuplicateRequest:
            async with contextlib.aclosing(self._resume(request_id, request, prompt, params, context, call)) as resumed:
                async for response in resumed:
                    yield response
            return
        except redis.RedisError as err:                  # served without a record: it cannot be resumed
            log.warning("request %s: recording it failed (%s); serving it without a record", request_id, err)
        await self._claim(request_id, call)
        metrics.PROMPT_TOKENS.inc(len(prompt))
        replica = await self._admit_or_end(request_id, context)
        stream = TextStream(self.tokenizer, request.stop)
        async with contextlib.aclosing(self._relay(request_id, prompt, params, seed, replica, context, stream)) as relay:
            async for response in relay:
                yield response

    async def _resume(self, request_id: str, request, prompt: list[int], params, context, call: _Call):
        """A retry of an existing request id (its client reconnected: its router or connection went away).
        A finished request (or one whose log holds its end: its run ended, its router went away before
        recording it) replays the tokens of its log past ``resume_from``; any other is queued again
        (its earlier run, if one still goes, aborted) and continues from its token log on a replica,
        with its recorded seed: the client gets every token once. The tokens replayed from the log come
        with their logprobs (the log keeps them), and stop strings are matched on them again: the text
        and tokens end where the first run ended."""
        record = await self._blocking(self.requests.get, request_id)
        if not _same_request(record, prompt, params, request):
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {request.request_id!r} exists with "
                                                                 f"another prompt or other sampling parameters")
        logged, logprobs = await self._blocking(self.requests.token_log, request_id)
        deadline = time.monotonic() + LOG_CATCH_UP_S            # the log is written asynchronously
        while request.resume_from > len(logged) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            logged, logprobs = await self._blocking(self.requests.token_log, request_id)
        if request.resume_from > len(logged):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"resume_from: {request.resume_from} is more "
                                                                   f"than the {len(logged)} tokens emitted")
        if params.logprobs is not None and len(logprobs or []) < len(logged):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"request_id: {request.request_id!r}: its "
                                                                      f"token log holds no logprobs to replay")
        stream = TextStream(self.tokenizer, request.stop)
        stream.push(logged[:request.resume_from])
        kept, text = stream.push(logged[request.resume_from:])      # the log may go on past a stop string
        logged = logged[:request.resume_from + kept]
        chunk = generation_pb2.GenerateResponse(request_id=request_id, chunk=generation_pb2.Chunk(
            token_ids=logged[request.resume_from:], text=text,
            logprobs=[logprobs_from_log(e) for e in (logprobs or [])[request.resume_from:len(logged)]]))
        ran_out = params.finish_reason(logged, self.model_info["eos_token_ids"])   # its run ended, unrecorded
        if record.state == "finished" or stream.stopped or ran_out:
            chunk.chunk.text += stream.finish()
            reason = "stop" if stream.stopped else record.finish_reason if record.state == "finished" else ran_out
            if record.state != "finished":             # its router stopped it or its run ended, then it went away
                self._record(self.requests.set_state, request_id, "finished", None, reason)
            yield chunk
            yield self._complete(request_id, reason, prompt, logged, stream)
            return
        log.info("request %s: resuming after %d tokens (%s, owner %s)", request_id, len(logged), record.state,
                 record.owner)
        await self._claim(request_id, call)                      # the same request, resumable: this call takes it
        await self._blocking(self.requests.reopen, request_id)
        if record.state == "running" and record.owner:
            await self._abort_on(record.owner, request_id)
        replica = await self._admit_or_end(request_id, context)
        if chunk.chunk.token_ids or chunk.chunk.text:
            yield chunk
        async with contextlib.aclosing(self._relay(request_id, prompt, params, record.seed, replica, context, stream,
                                                   logged)) as relay:
            async for response in relay:
                yield response

    def _complete(self, request_id, reason: str | None, prompt, token_ids: list[int], stream: TextStream):
        """The ``complete`` of a request that ended with ``reason`` after ``token_ids``."""
        text = stream.text if stream.stopped else self.tokenizer.decode(token_ids)
        return generation_pb2.GenerateResponse(request_id=request_id, complete=generation_pb2.Complete(
            finish_reason=FINISH_REASONS.get(reason, 0), token_ids=token_ids, text=text,
            usage=generation_pb2.Usage(prompt_tokens=len(prompt), completion_tokens=len(token_ids))))

    async def _admit_or_end(self, request_id: str, context) -> Replica:
        """A replica for the request; when none can be had, the call ends and the request is forgotten
        (no prompt stays in Redis), or failed when it had emitted tokens (a resumed one)."""
        queued = time.monotonic()
        try:
            replica = await self._admit(context.time_remaining())
            metrics.QUEUE_TIME.observe(time.monotonic() - queued)
            return replica
        except tuple(_ADMISSION_ERRORS) as err:
            metrics.REFUSED.labels(_ADMISSION_ERRORS[type(err)].name).inc()
            self._record(self.requests.refuse, request_id)
            await context.abort(_ADMISSION_ERRORS[type(err)], str(err))

    async def _abort_on(self, replica_id: str, request_id: str) -> None:
        """Abort the request on replica ``replica_id`` if it is live there (best effort)."""
        replicas = await self._blocking(self.admission.replicas)
        replica = next((r for r in replicas if r.service_id == replica_id), None)
        if replica is None:
            return
        try:
            await self.sessions.stub(replica.address).Abort(generation_pb2.AbortRequest(request_id=request_id),
                                                            timeout=5)
        except grpc.RpcError as err:
            log.warning("request %s: aborting its earlier run on %s failed: %s", request_id, replica_id, err)

    async def _admit(self, timeout_s: float | None) -> Replica:
        """A replica from admission (on a thread: it may wait in the queue). A cancelled caller
        leaves the queue, and a replica its thread got meanwhile is handed back."""
        cancelled = threading.Event()
        acquired: Future = self._pool.submit(self.admission.acquire, timeout_s, cancelled)
        try:
            return await asyncio.wrap_future(acquired)
        except asyncio.CancelledError:
            cancelled.set()
            acquired.add_done_callback(self._release_unused)
            raise

    def _release_unused(self, acquired: Future) -> None:
        if not acquired.cancelled() and acquired.exception() is None:
            self.admission.release(acquired.result())

    async def _relay(self, request_id, prompt, params, seed, replica: Replica, context, stream: TextStream,
                     emitted: list[int] = ()):
        """Stream the request's tokens from ``replica`` through ``stream``, after the ``emitted`` ones (a
        resumed request; ``stream`` has taken them), until the replica finishes it or a stop string
        ends it (then its run there is aborted). When the replica goes away (its session breaks, or it
        refuses as UNAVAILABLE), resubmit on a replica admission picks (the restarted one, or another)
        with the tokens already streamed: it recomputes them and goes on, and the client sees each
        token once (greedy and seeded sampling give the tokens an undisturbed run would)."""
        token_ids, ended, session, resumes = list(emitted), False, None, 0
        try:
            run, session = await self._submit(request_id, prompt, params, seed, token_ids, replica)
            while not ended:
                event = await run.events.get()
                if _replica_gone(event) and resumes < self.resume_attempts:
                    log.warning("request %s: replica %s gone (%s); resuming after %d tokens",
                                request_id, replica.service_id, _details(event), len(token_ids))
                    self._pool.submit(self.admission.release, replica)
                    replica, session = None, None
                    replica, resumes = await self._readmit(resumes, request_id, context)
                    run, session = await self._submit(request_id, prompt, params, seed, token_ids, replica)
                    continue
                if isinstance(event, SessionBroken) or event.HasField("error"):
                    ended = True
                    response = await self._replica_failed(request_id, replica, event, context)
                    yield response
                    return
                kept, text = stream.push(event.token_ids)
                token_ids += event.token_ids[:kept]
                if event.finished or stream.stopped:
                    text += stream.finish()
                if kept or text:
                    yield generation_pb2.GenerateResponse(request_id=request_id, chunk=generation_pb2.Chunk(
                        token_ids=event.token_ids[:kept], text=text, logprobs=event.logprobs[:kept]))
                if event.finished or stream.stopped:
                    ended = event.finished                # else a stop string: aborted on the replica below
                    reason = "stop" if stream.stopped else FINISH_REASON_NAMES.get(event.finish_reason, "stop")
                    self._record(self.requests.set_state, request_id,
                                 "aborted" if reason == "abort" else "finished", None, reason)
                    yield self._complete(request_id, reason, prompt, token_ids, stream)
                    return
        finally:
            if session is not None and not ended:
                session.abort(run)                        # frees its KV on the replica
            if replica is not None:
                self._pool.submit(self.admission.release, replica)     # its lock may be held across Redis calls

    async def _submit(self, request_id, prompt, params, seed, emitted: list[int], replica: Replica):
        """Record the owner and submit on the replica's session; -> (the run, the session)."""
        self._record(self.requests.set_state, request_id, "running", replica.service_id)
        session = self.sessions.get(replica.address)
        run = session.submit(attention_pb2.SubmitRequest(request_id=request_id, prompt_ids=prompt,
                                                            sampling=sampling_to_proto(params), seed=seed,
                                                            emitted_ids=emitted))
        return run, session

    async def _readmit(self, resumes: int, request_id: str, context) -> tuple[Replica, int]:
        """A replica from admission after a backoff (0.25 s doubling to 2 s: a restarting replica
        re-registers, a dead one leaves the registry), counting each try; -> (replica, tries so far).
        When none can be had within ``resume_attempts``, the call ends with admission's status."""
        while True:
            resumes += 1
            await asyncio.sleep(min(0.25 * 2 ** (resumes - 1), 2.0))
            try:
                return await self._admit(context.time_remaining()), resumes
            except tuple(_ADMISSION_ERRORS) as err:
                if resumes < self.resume_attempts and isinstance(err, NoReplicas):
                    continue                             # the only replica restarting: not registered yet
                self._record(self.requests.set_state, request_id, "failed")
                await context.abort(_ADMISSION_ERRORS[type(err)], f"resuming after its replica went away: {err}")

    async def _replica_failed(self, request_id: str, replica: Replica, failure, context):
        """Record the failure; INVALID_ARGUMENT ends the call with that status, others become an error
        response. ``failure`` is a ``SessionBroken`` or a finished event with ``error`` set."""
        if isinstance(failure, SessionBroken):
            code, details = failure.code, failure.details
        else:
            code, details = _status_code(failure.error.code), failure.error.message
        self._record(self.requests.set_state, request_id, "failed")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            await context.abort(code, details)
        log.warning("request %s failed on replica %s: %s", request_id, replica.service_id, details)
        return generation_pb2.GenerateResponse(request_id=request_id, error=generation_pb2.Error(
            code=code.value[0], message=f"attention replica {replica.service_id}: {details}"))

    async def GetModelInfo(self, request, context):
        info = dict(self.model_info)
        replicas = await self._blocking(self.admission.replicas)
        info["attention_replicas"] = len(replicas)
        if replicas:
            info["kv_cache_bytes_per_token"] = replicas[0].info.get("kv_bytes_per_token", info["kv_cache_bytes_per_token"])
        info.update(await self._blocking(self.placement_summary) or {})
        return generation_pb2.ModelInfo(request_id=request.request_id, **info)

    async def Abort(self, request, context):
        """Abort a running request of the caller's (another key's request with that id is not found)."""
        request_id = namespaced(self._tenant(context), request.request_id)
        record = await self._blocking(self.requests.get, request_id)
        if record is None or not record.owner or record.state not in ("queued", "running"):
            return generation_pb2.AbortResponse(request_id=request.request_id, found=False)
        replicas = await self._blocking(self.admission.replicas)
        replica = next((r for r in replicas if r.service_id == record.owner), None)
        if replica is None:
            return generation_pb2.AbortResponse(request_id=request.request_id, found=False)
        reply = await self.sessions.stub(replica.address).Abort(
            generation_pb2.AbortRequest(request_id=request_id), timeout=10)
        return generation_pb2.AbortResponse(request_id=request.request_id, found=reply.found)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._records.put(None)                        # what is queued first is written while Redis answers


async def _metered(responses, started: float):
    """Pass ``responses`` through, recording the request's latencies, tokens and finish reason."""
    first, tokens = None, 0
    metrics.RUNNING.inc()
    try:
        async for response in responses:
            kind = response.WhichOneof("response")
            if kind == "chunk" and response.chunk.token_ids:
                tokens += len(response.chunk.token_ids)
                metrics.GENERATION_TOKENS.inc(len(response.chunk.token_ids))
                if first is None:
                    first = time.monotonic()
                    metrics.TTFT.observe(first - started)
            elif kind == "complete":
                end = time.monotonic()
                metrics.E2E.observe(end - started)
                if first is not None and tokens > 1:
                    metrics.TPOT.observe((end - first) / (tokens - 1))
                metrics.SUCCESS.labels(FINISH_REASON_NAMES.get(response.complete.finish_reason, "stop")).inc()
            yield response
    finally:
        metrics.RUNNING.dec()
        await responses.aclose()              # a client gone: the relay's own clean-up (abort on the replica)


_RESUBMITTABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED)


def _replica_gone(event) -> bool:
    """The replica's session broke, or the replica refused as UNAVAILABLE (draining), ALREADY_EXISTS (an
    earlier run of the id still being aborted there) or RESOURCE_EXHAUSTED (full: other routers filled
    it): resubmitting after a backoff, maybe elsewhere, may succeed."""
    if isinstance(event, SessionBroken):
        return event.code != grpc.StatusCode.CANCELLED
    return event.HasField("error") and _status_code(event.error.code) in _RESUBMITTABLE


def _details(event) -> str:
    return event.details if isinstance(event, SessionBroken) else event.error.message


def _status_code(value: int) -> grpc.StatusCode:
    return next((code for code in grpc.StatusCode if code.value[0] == value), grpc.StatusCode.UNKNOWN)


_RECORD_DEFAULTS = {"logprobs": None, "stop": []}   # sampling fields a record of an older router lacks


def _same_request(record: RequestRecord | None, prompt: list[int], params, request) -> bool:
    """Whether a call may resume ``record``: the same prompt and sampling (and seed, when it names one)."""
    return (record is not None and record.prompt_ids == prompt
            and _RECORD_DEFAULTS | record.sampling == _params_dict(params, request)
            and (params.seed is None or params.seed == record.seed))


def _params_dict(params, request) -> dict:
    """What a resume must give again, as the record keeps it (the seed apart)."""
    return {"max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p,
            "top_k": params.top_k, "stop_token_ids": list(params.stop_token_ids), "ignore_eos": params.ignore_eos,
            "logprobs": params.logprobs, "stop": list(request.stop)}


def add_to_server(servicer: GenerationServicer):
    return lambda server: generation_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, server)
