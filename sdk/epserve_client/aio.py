"""Asyncio client of ``epserve.v1.GenerationService`` (``grpc.aio``); same API as :class:`Client`, awaited."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from epserve_client import _wire
from epserve_client._proto import generation_pb2 as pb
from epserve_client._proto.generation_pb2_grpc import GenerationServiceStub
from epserve_client._wire import CLIENT_DEFAULT, Timeout
from epserve_client.errors import Cancelled, error_from_rpc
from epserve_client.results import GenerateResult, ModelInfo, StreamChunk


class AsyncGenerateStream(AsyncIterator[StreamChunk]):
    """The chunks of one ``Generate`` call (``async for``); afterwards :attr:`result` holds the final result.

    Iterating raises a typed :class:`~epserve_client.EpserveError` on failure. To stop early, call
    :meth:`cancel` or iterate inside ``async with client.stream(...) as stream:``; a stream dropped
    unfinished is cancelled when it is garbage-collected.
    """

    def __init__(self, call: Any, request_id: str | None, resumer: _wire.Resumer | None = None,
                 reopen: Callable[[Any, float | None, int], Any] | None = None, *, logprobs: bool = False):
        self._call = call
        self._state = _wire.StreamState(request_id, logprobs)
        self._resumer, self._reopen = resumer, reopen     # reopen(request, timeout, router index) -> call
        self._done = False  # no more chunks will come
        self._cancelled = False  # the caller cancelled before the end

    @property
    def request_id(self) -> str | None:
        """The caller's request id, or the server's once its first response arrived."""
        return self._state.request_id

    @property
    def result(self) -> GenerateResult:
        """The final :class:`GenerateResult`; only once the stream is exhausted."""
        if self._state.result is None:
            raise RuntimeError("the stream has not finished: iterate it to the end first")
        return self._state.result

    def cancel(self) -> None:
        """Cancels the call; iterating afterwards raises :class:`~epserve_client.Cancelled`."""
        if not self._done:
            self._done = self._cancelled = True
            self._call.cancel()

    async def __anext__(self) -> StreamChunk:
        if self._cancelled:
            raise Cancelled(grpc.StatusCode.CANCELLED, "cancelled by the caller", self._state.request_id)
        if self._done:
            raise StopAsyncIteration
        try:
            chunk = await self._next_chunk()
        except grpc.RpcError as error:
            self._done = True
            raise error_from_rpc(error, self._state.request_id) from error
        except BaseException:  # a typed in-stream error, or the awaiting task was cancelled
            self._done = True
            self._call.cancel()
            raise
        if chunk is None:
            self._done = True
            raise StopAsyncIteration
        return chunk

    async def __aenter__(self) -> AsyncGenerateStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()

    async def _next_chunk(self) -> StreamChunk | None:
        while True:
            try:
                response = await self._call.read()
            except grpc.RpcError as error:
                if self._cancelled or self._resumer is None or not self._resumer.resumable(error, self._state):
                    raise
                request, wait, timeout, index = self._resumer.next(self._state)
                await asyncio.sleep(wait)
                self._call = self._reopen(request, timeout, index)
                continue
            if response is grpc.aio.EOF:
                self._state.finish()
                return None
            chunk = self._state.feed(response)
            if chunk is not None:
                return chunk


class AsyncClient:
    """Asyncio client of an epserve cluster's public API; arguments as for :class:`~epserve_client.Client`.

    Create it inside a running event loop (``grpc.aio`` binds the channel to it).
    """

    def __init__(self, target: str | Sequence[str], *, api_key: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, timeout: float | None = 60.0, max_retries: int = 4,
                 initial_backoff: float = 0.1, max_backoff: float = 2.0, options: Sequence[tuple[str, Any]] = (),
                 resume_attempts: int = 8, wait_for_ready: bool = False):
        self._settings = _wire.settings(
            target, api_key=api_key, tls=tls, root_certificates=root_certificates, timeout=timeout,
            max_retries=max_retries, initial_backoff=initial_backoff, max_backoff=max_backoff, options=options,
            resume_attempts=resume_attempts, wait_for_ready=wait_for_ready)
        self._channels: dict[int, Any] = {}
        self._stub = self._router(0)

    def _router(self, index: int) -> GenerationServiceStub:
        """The stub of router ``index`` of the target list (its channel opened on first use)."""
        if index not in self._channels:
            self._channels[index] = self._settings.open(grpc.aio, self._settings.targets[index])
        return GenerationServiceStub(self._channels[index])

    async def generate(self, prompt: str | Sequence[int], *, max_tokens: int = 16, temperature: float | None = None,
                       top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                       stop_token_ids: Sequence[int] = (), stop: str | Sequence[str] = (), ignore_eos: bool = False,
                       logprobs: int | None = None, request_id: str | None = None,
                       timeout: Timeout = CLIENT_DEFAULT) -> GenerateResult:
        """Generates to the end and returns the result; arguments as for :meth:`Client.stream`."""
        async with self.stream(prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                               seed=seed, stop_token_ids=stop_token_ids, stop=stop, ignore_eos=ignore_eos,
                               logprobs=logprobs, request_id=request_id, timeout=timeout) as stream:
            async for _ in stream:
                pass
        return stream.result

    def stream(self, prompt: str | Sequence[int], *, max_tokens: int = 16, temperature: float | None = None,
               top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
               stop_token_ids: Sequence[int] = (), stop: str | Sequence[str] = (), ignore_eos: bool = False,
               logprobs: int | None = None, request_id: str | None = None,
               timeout: Timeout = CLIENT_DEFAULT) -> AsyncGenerateStream:
        """Starts a generation; ``async for`` over the returned stream, then read its ``.result``.

        Not a coroutine: the call starts at once. Arguments as for :meth:`Client.stream`.
        """
        request = _wire.generate_request(
            prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
            stop_token_ids=stop_token_ids, stop=stop, ignore_eos=ignore_eos, logprobs=logprobs,
            request_id=request_id)
        deadline = self._settings.deadline(timeout)
        resumer = _wire.resumer(request, self._settings, deadline)
        call = self._stub.Generate(request, **self._settings.call_options(deadline))
        return AsyncGenerateStream(call, request_id, resumer, self._reopen, logprobs=logprobs is not None)

    def _reopen(self, request: pb.GenerateRequest, timeout: float | None, index: int) -> Any:
        return self._router(index).Generate(request, **self._settings.call_options(timeout))

    async def model_info(self, *, timeout: Timeout = CLIENT_DEFAULT) -> ModelInfo:
        """What the cluster serves: model, vocabulary, context, replicas and shards."""
        return _wire.model_info(await self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout, None))

    async def abort(self, request_id: str, *, timeout: Timeout = CLIENT_DEFAULT) -> bool:
        """Aborts a running request; True if the server found it (its stream then ends with "abort")."""
        response = await self._unary(self._stub.Abort, pb.AbortRequest(request_id=request_id), timeout, request_id)
        return response.found

    async def close(self) -> None:
        """Closes the channels; calls in flight are cancelled."""
        for channel in self._channels.values():
            await channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _unary(self, method: Any, request: Any, timeout: Timeout, request_id: str | None) -> Any:
        try:
            return await method(request, **self._settings.call_options(self._settings.deadline(timeout)))
        except grpc.RpcError as error:
            raise error_from_rpc(error, request_id) from error
