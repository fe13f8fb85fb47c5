"""Blocking client of ``epserve.v1.GenerationService``."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from epserve_client import _wire
from epserve_client._proto import generation_pb2 as pb
from epserve_client._proto.generation_pb2_grpc import GenerationServiceStub
from epserve_client._wire import CLIENT_DEFAULT, Timeout
from epserve_client.errors import error_from_rpc
from epserve_client.results import GenerateResult, ModelInfo, StreamChunk


class GenerateStream(Iterator[StreamChunk]):
    """The chunks of one ``Generate`` call; after the last one, :attr:`result` holds the final result.

    Iterating raises a typed :class:`~epserve_client.EpserveError` on failure. To stop early, call
    :meth:`cancel` or iterate inside ``with client.stream(...) as stream:``; a stream dropped
    unfinished is cancelled when it is garbage-collected.
    """

    def __init__(self, call: Any, request_id: str | None, resumer: _wire.Resumer | None = None,
                 reopen: Callable[[Any, float | None, int], Any] | None = None, *, logprobs: bool = False):
        self._call = call
        self._state = _wire.StreamState(request_id, logprobs)
        self._resumer, self._reopen = resumer, reopen     # reopen(request, timeout, router index) -> call
        self._cancelled = False
        self._chunks = self._read()

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
        self._cancelled = True
        self._call.cancel()

    def __next__(self) -> StreamChunk:
        return next(self._chunks)

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()

    def _read(self) -> Iterator[StreamChunk]:
        try:
            while True:
                try:
                    for response in self._call:
                        chunk = self._state.feed(response)
                        if chunk is not None:
                            yield chunk
                    self._state.finish()
                    return
                except grpc.RpcError as error:
                    if self._cancelled or self._resumer is None or not self._resumer.resumable(error, self._state):
                        raise error_from_rpc(error, self._state.request_id) from error
                    request, wait, timeout, index = self._resumer.next(self._state)
                    time.sleep(wait)
                    self._call = self._reopen(request, timeout, index)
        finally:
            self._call.cancel()  # no-op once the call has finished


class Client:
    """Blocking client of an epserve cluster's public API.

    ``target`` is ``host:port`` of a router, or a list of routers (calls go to the first; a resumed
    stream to the next). ``api_key`` is sent as ``authorization: Bearer <key>`` on every call.
    ``tls=True`` verifies the server against ``root_certificates`` (PEM; the system roots when None).
    ``timeout`` (seconds, None for none) is the default deadline of each call. Calls failing with
    UNAVAILABLE are retried by gRPC up to ``max_retries`` times with exponential backoff from
    ``initial_backoff`` to ``max_backoff`` seconds, a stream only before its first response; a
    stream that breaks later (its router died) is resumed up to ``resume_attempts`` times: called
    again (on the next router of the list) with its request id and the number of tokens received,
    it goes on where it was, each token once (0: off). ``wait_for_ready=True`` makes a call to a
    router that cannot be reached (restarting, not up yet) wait for it until the call's deadline,
    instead of failing with UNAVAILABLE once the retries are spent: a client that rides out a router
    restart of any length within its deadline (gRPC's wait-for-ready semantics). ``options`` are extra
    gRPC channel options.
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
            self._channels[index] = self._settings.open(grpc, self._settings.targets[index])
        return GenerationServiceStub(self._channels[index])

    def generate(self, prompt: str | Sequence[int], *, max_tokens: int = 16, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                 stop_token_ids: Sequence[int] = (), stop: str | Sequence[str] = (), ignore_eos: bool = False,
                 logprobs: int | None = None, request_id: str | None = None,
                 timeout: Timeout = CLIENT_DEFAULT) -> GenerateResult:
        """Generates to the end and returns the result. See :meth:`stream` for the arguments."""
        stream = self.stream(prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                             seed=seed, stop_token_ids=stop_token_ids, stop=stop, ignore_eos=ignore_eos,
                             logprobs=logprobs, request_id=request_id, timeout=timeout)
        for _ in stream:
            pass
        return stream.result

    def stream(self, prompt: str | Sequence[int], *, max_tokens: int = 16, temperature: float | None = None,
               top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
               stop_token_ids: Sequence[int] = (), stop: str | Sequence[str] = (), ignore_eos: bool = False,
               logprobs: int | None = None, request_id: str | None = None,
               timeout: Timeout = CLIENT_DEFAULT) -> GenerateStream:
        """Starts a generation and returns its chunks as they come.

        ``prompt``: text (tokenised by the server, BOS added) or token ids (used as given). Sampling
        fields left None take the server's defaults (temperature 1, top_p 1, top_k off, random seed).
        ``stop``: stop strings (at most 16): the generation ends where the first appears in its text,
        which ends before it (finish reason ``"stop"``). ``logprobs``: None for none; k in [0, 20]
        for each token's logprob (of the model's raw distribution) and those of the k most probable
        tokens, in each chunk's and the result's ``logprobs``. ``request_id``: the router assigns one
        when None. ``timeout``: this call's deadline in seconds (None: none); the client's when not
        given. When the loop ends, ``.result`` of the returned stream holds the :class:`GenerateResult`.
        """
        request = _wire.generate_request(
            prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
            stop_token_ids=stop_token_ids, stop=stop, ignore_eos=ignore_eos, logprobs=logprobs,
            request_id=request_id)
        deadline = self._settings.deadline(timeout)
        resumer = _wire.resumer(request, self._settings, deadline)
        call = self._stub.Generate(request, **self._settings.call_options(deadline))
        return GenerateStream(call, request_id, resumer, self._reopen, logprobs=logprobs is not None)

    def _reopen(self, request: pb.GenerateRequest, timeout: float | None, index: int) -> Any:
        return self._router(index).Generate(request, **self._settings.call_options(timeout))

    def model_info(self, *, timeout: Timeout = CLIENT_DEFAULT) -> ModelInfo:
        """What the cluster serves: model, vocabulary, context, replicas and shards."""
        return _wire.model_info(self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout, None))

    def abort(self, request_id: str, *, timeout: Timeout = CLIENT_DEFAULT) -> bool:
        """Aborts a running request; True if the server found it (its stream then ends with "abort")."""
        response = self._unary(self._stub.Abort, pb.AbortRequest(request_id=request_id), timeout, request_id)
        return response.found

    def close(self) -> None:
        """Closes the channels; calls in flight are cancelled."""
        for channel in self._channels.values():
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _unary(self, method: Any, request: Any, timeout: Timeout, request_id: str | None) -> Any:
        try:
            return method(request, **self._settings.call_options(self._settings.deadline(timeout)))
        except grpc.RpcError as error:
            raise error_from_rpc(error, request_id) from error
