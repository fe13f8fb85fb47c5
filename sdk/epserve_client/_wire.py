"""What the sync and async clients share: channel settings, request building, response folding."""
from __future__ import annotations

import json
import operator
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from epserve_client._proto import generation_pb2 as pb
from epserve_client.errors import EpserveError, error_for, status_code
from epserve_client.results import FinishReason, GenerateResult, ModelInfo, StreamChunk, TokenLogprobs, Usage

SERVICE = "epserve.v1.GenerationService"
_FINISH_REASONS: dict[int, FinishReason] = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}


class ClientDefault:
    """Type of :data:`CLIENT_DEFAULT`: "use the timeout the client was created with"."""

    def __repr__(self) -> str:
        return "<client default>"


CLIENT_DEFAULT = ClientDefault()
Timeout = float | None | ClientDefault


@dataclass(frozen=True)
class Settings:
    """Everything a channel and its calls need, validated once by :func:`settings`."""

    targets: tuple[str, ...]            # routers: the first, then the others for resumed streams
    credentials: grpc.ChannelCredentials | None
    options: tuple[tuple[str, Any], ...]
    metadata: tuple[tuple[str, str], ...]
    timeout: float | None
    resume_attempts: int
    wait_for_ready: bool                # a call waits for an unreachable router (to its deadline) instead of failing

    def open(self, module: Any, target: str) -> Any:
        """A channel to ``target`` from ``module`` (``grpc`` or ``grpc.aio``): secure when TLS was asked for."""
        if self.credentials is None:
            return module.insecure_channel(target, options=self.options)
        return module.secure_channel(target, self.credentials, options=self.options)

    def deadline(self, timeout: Timeout) -> float | None:
        """The gRPC ``timeout`` of one call: its own, or the client's when not given."""
        return self.timeout if isinstance(timeout, ClientDefault) else timeout

    def call_options(self, timeout: float | None) -> dict[str, Any]:
        """The keyword arguments of one gRPC call with deadline ``timeout``."""
        return {"timeout": timeout, "metadata": self.metadata, "wait_for_ready": self.wait_for_ready}


def settings(target: str | Sequence[str], *, api_key: str | None, tls: bool, root_certificates: bytes | None,
             timeout: float | None, max_retries: int, initial_backoff: float, max_backoff: float,
             options: Sequence[tuple[str, Any]], resume_attempts: int = 8, wait_for_ready: bool = False) -> Settings:
    """Validates the client's arguments and turns them into channel options, credentials, metadata."""
    targets = (target,) if isinstance(target, str) else tuple(target)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target must be a host:port or a non-empty list of them, got {target!r}")
    if resume_attempts < 0:
        raise ValueError(f"resume_attempts must be >= 0, got {resume_attempts}")
    if root_certificates is not None and not tls:
        raise ValueError("root_certificates given without tls=True")
    credentials = grpc.ssl_channel_credentials(root_certificates) if tls else None
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    config = service_config(max_retries, initial_backoff, max_backoff)
    channel_options = (("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config)), *options)
    return Settings(targets, credentials, channel_options, metadata, timeout, resume_attempts, wait_for_ready)


def service_config(max_retries: int, initial_backoff: float, max_backoff: float) -> dict:
    """gRPC service config that retries every method on UNAVAILABLE with exponential backoff.

    gRPC retries a server stream only until its first response arrives, so a ``Generate`` that
    already yielded tokens is never replayed. gRPC caps attempts at 5, hence ``max_retries <= 4``.
    """
    if not 0 <= max_retries <= 4:
        raise ValueError(f"max_retries must be in [0, 4] (gRPC allows at most 5 attempts), got {max_retries}")
    if not 0 < initial_backoff <= max_backoff:
        raise ValueError(f"need 0 < initial_backoff <= max_backoff, got {initial_backoff} and {max_backoff}")
    method_config: dict[str, Any] = {
        "name": [{"service": SERVICE, "method": m} for m in ("Generate", "GetModelInfo", "Abort")],
    }
    if max_retries:
        method_config["retryPolicy"] = {
            "maxAttempts": max_retries + 1,
            "initialBackoff": _duration(initial_backoff),
            "maxBackoff": _duration(max_backoff),
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return {"methodConfig": [method_config]}


def _duration(seconds: float) -> str:
    """Seconds in the JSON ``google.protobuf.Duration`` form the service config wants (``"0.1s"``)."""
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def generate_request(prompt: str | Sequence[int], *, max_tokens: int, temperature: float | None,
                     top_p: float | None, top_k: int | None, seed: int | None, stop_token_ids: Sequence[int],
                     stop: str | Sequence[str], ignore_eos: bool, logprobs: int | None,
                     request_id: str | None) -> pb.GenerateRequest:
    """A ``GenerateRequest``: a ``str`` prompt goes as ``text``, a sequence of ints as ``token_ids``.

    Unset optional sampling fields stay unset, so the server applies its defaults.
    """
    sampling = pb.SamplingParams(max_tokens=max_tokens, stop_token_ids=[operator.index(t) for t in stop_token_ids],
                                 ignore_eos=ignore_eos, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                 logprobs=logprobs)
    stops = [stop] if isinstance(stop, str) else list(stop)
    request = pb.GenerateRequest(request_id=request_id or "", sampling=sampling, stop=stops)
    if isinstance(prompt, str):
        request.text = prompt
    elif isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
        request.token_ids.ids.extend(operator.index(t) for t in prompt)
    else:
        raise TypeError(f"prompt must be a str or a sequence of token ids, got {type(prompt).__name__}")
    return request


def model_info(response: pb.ModelInfo) -> ModelInfo:
    """The :class:`ModelInfo` dataclass of a ``ModelInfo`` message."""
    return ModelInfo(
        request_id=response.request_id, model=response.model, vocab_size=response.vocab_size,
        max_context=response.max_context, kv_cache_bytes_per_token=response.kv_cache_bytes_per_token,
        attention_replicas=response.attention_replicas, expert_shards=response.expert_shards,
        placement_version=response.placement_version, eos_token_ids=list(response.eos_token_ids),
    )


class StreamState:
    """Folds ``GenerateResponse`` messages into chunks and the final result, for both clients.

    ``request_id`` is the caller's until the server's first response names it; ``logprobs``: whether
    the request asked for them (they are gathered from the chunks for the result).
    """

    def __init__(self, request_id: str | None, logprobs: bool = False):
        self.request_id = request_id or None
        self.logprobs: list[TokenLogprobs] | None = [] if logprobs else None
        self.result: GenerateResult | None = None
        self.received = 0                      # token ids in the chunks so far (where a resume starts)
        self.answered = False                  # a response arrived (the server knows the request)

    def feed(self, response: pb.GenerateResponse) -> StreamChunk | None:
        """The chunk in ``response``, or None for ``complete``; raises the typed error for ``error``."""
        self.request_id = response.request_id or self.request_id
        self.answered = True
        kind = response.WhichOneof("response")
        if self.result is not None:
            raise self.protocol_error(f"{kind or 'empty'} message after complete")
        if kind == "chunk":
            chunk = response.chunk
            if self.logprobs is not None and len(chunk.logprobs) != len(chunk.token_ids):
                raise self.protocol_error(f"a chunk of {len(chunk.token_ids)} tokens with "
                                          f"{len(chunk.logprobs)} logprobs")
            self.received += len(chunk.token_ids)
            logprobs = [TokenLogprobs(t, lp.logprob, list(zip(lp.top_token_ids, lp.top_logprobs)))
                        for t, lp in zip(chunk.token_ids, chunk.logprobs)]
            if self.logprobs is not None:
                self.logprobs += logprobs
            return StreamChunk(self.request_id or "", list(chunk.token_ids), chunk.text, logprobs)
        if kind == "complete":
            self.result = self._result(response.complete)
            return None
        if kind == "error":
            raise error_for(status_code(response.error.code), response.error.message, self.request_id)
        raise self.protocol_error("response without chunk, complete or error")

    def finish(self) -> GenerateResult:
        """The final result once the stream has ended; raises if the server never sent ``complete``."""
        if self.result is None:
            raise self.protocol_error("stream ended without a complete message")
        return self.result

    def protocol_error(self, what: str) -> EpserveError:
        """An INTERNAL error for a server that broke the stream contract."""
        return EpserveError(grpc.StatusCode.INTERNAL, f"server broke the Generate contract: {what}", self.request_id)

    def _result(self, complete: pb.Complete) -> GenerateResult:
        reason = _FINISH_REASONS.get(complete.finish_reason)
        if reason is None:
            raise self.protocol_error(f"finish_reason {complete.finish_reason} in complete")
        usage = Usage(complete.usage.prompt_tokens, complete.usage.completion_tokens)
        return GenerateResult(self.request_id or "", list(complete.token_ids), complete.text, reason, usage,
                              self.logprobs)


@dataclass
class Resumer:
    """When and how a broken ``Generate`` stream is resumed, for both clients.

    A stream that fails with UNAVAILABLE after its first response (its router died or restarted) is
    called again with the request id the server named and ``resume_from`` = the tokens received, on the next
    router of the client's list, after a backoff (0.25 s doubling to 2 s), up to
    ``Settings.resume_attempts`` times; the deadline is the first call's.
    """

    request: pb.GenerateRequest
    settings: Settings
    deadline_at: float | None              # time.monotonic() when the call's deadline passes
    attempts: int = 0

    def resumable(self, error: grpc.RpcError, state: StreamState) -> bool:
        """Whether to resume after ``error``: UNAVAILABLE once the server has answered (before that,
        gRPC's retry policy retries) and named the request, attempts left, not finished."""
        return (error.code() == grpc.StatusCode.UNAVAILABLE and self.attempts < self.settings.resume_attempts
                and state.result is None and state.answered and bool(state.request_id))

    def next(self, state: StreamState) -> tuple[pb.GenerateRequest, float, float | None, int]:
        """-> (the request to send, seconds to wait first, its timeout, the index of the router to call)."""
        self.attempts += 1
        request = pb.GenerateRequest()
        request.CopyFrom(self.request)
        request.request_id, request.resume_from = state.request_id, state.received
        timeout = None if self.deadline_at is None else max(0.0, self.deadline_at - time.monotonic())
        return request, min(0.25 * 2 ** (self.attempts - 1), 2.0), timeout, self.attempts % len(self.settings.targets)


def resumer(request: pb.GenerateRequest, settings: Settings, timeout: float | None) -> Resumer:
    """The resume policy of a new stream."""
    return Resumer(request, settings, None if timeout is None else time.monotonic() + timeout)
