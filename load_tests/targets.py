"""Who is measured: one interface over the epserve gRPC API (through the SDK) and any
OpenAI-compatible ``/v1/completions`` streaming endpoint, so both go through the same measuring code.

``stream(spec, reply, seed)`` yields, per streamed chunk, the number of tokens it carried, fills
``reply`` with the server's token counts when it reports them, and raises :class:`TargetError` with
a status: the gRPC status name (``UNAVAILABLE``), ``HTTP 503``, ``CONNECTION_ERROR`` or
``PROTOCOL_ERROR``.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from epserve.load_tests.http_sse import HttpClient, HttpStatusError
from epserve.load_tests.workloads import RequestSpec


class TargetError(Exception):
    def __init__(self, status: str, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@dataclass
class Reply:
    """Token counts the server reported for one request (None when it did not)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True)
class Sampling:
    temperature: float | None   # None: the server's default
    ignore_eos: bool


class Target(Protocol):
    backend: str
    model_id: str
    vocab_size: int | None

    async def open(self) -> None: ...

    def stream(self, spec: RequestSpec, reply: Reply, seed: int) -> AsyncIterator[int]: ...

    async def close(self) -> None: ...


class EpserveTarget:
    """An epserve cluster's public ``GenerationService`` through ``epserve_client.AsyncClient``."""

    backend = "epserve"

    def __init__(self, endpoint: str, sampling: Sampling, timeout_s: float, api_key: str | None = None):
        self.endpoint, self.sampling, self.timeout_s, self.api_key = endpoint, sampling, timeout_s, api_key
        self.model_id, self.vocab_size = "", None

    async def open(self) -> None:
        # the SDK is needed only for this target
        from epserve_client import AsyncClient, EpserveError

        # wait_for_ready: a request sent while the router restarts waits for it (its time shows as latency)
        # instead of failing after the SDK's retries (about 1.5 s), as a patient client would
        self._client = AsyncClient(self.endpoint, api_key=self.api_key, timeout=self.timeout_s, wait_for_ready=True)
        try:
            info = await self._client.model_info(timeout=30)
        except EpserveError as err:
            await self._client.close()
            raise TargetError(err.code.name, f"{self.endpoint}: {err.message}") from None
        self.model_id, self.vocab_size = info.model, info.vocab_size

    async def stream(self, spec: RequestSpec, reply: Reply, seed: int) -> AsyncIterator[int]:
        from epserve_client import EpserveError

        stream = self._client.stream(spec.prompt, max_tokens=spec.output_len, temperature=self.sampling.temperature,
                                     seed=seed, ignore_eos=self.sampling.ignore_eos)
        try:
            async with stream:
                async for chunk in stream:
                    yield len(chunk.token_ids)
        except EpserveError as err:
            raise TargetError(err.code.name, err.message) from None
        usage = stream.result.usage
        reply.prompt_tokens, reply.completion_tokens = usage.prompt_tokens, usage.completion_tokens

    async def close(self) -> None:
        await self._client.close()


class OpenAITarget:
    """``POST {base_url}{path}`` with ``"stream": true``; counts tokens per SSE chunk from ``token_ids``
    (vLLM's ``return_token_ids``) or ``logprobs.tokens`` when present, else 1 per chunk with text."""

    backend = "openai"

    def __init__(self, base_url: str, path: str, model: str | None, sampling: Sampling, api_key: str | None = None,
                 extra_body: dict | None = None, vocab_size: int | None = None):
        self.base_url, self.path, self.sampling, self.extra_body = base_url, path, sampling, extra_body or {}
        self.model_id, self.vocab_size = model or "", vocab_size
        self._http = HttpClient(base_url, {"Authorization": f"Bearer {api_key}"} if api_key else None)

    async def open(self) -> None:
        if self.model_id:
            return
        try:
            models = await self._http.get_json("/v1/models")
            self.model_id = models["data"][0]["id"]
        except (HttpStatusError, OSError, ValueError, KeyError, IndexError, TypeError) as err:
            message = f"{self.base_url}/v1/models gave no model ({err}); pass --model"
            raise TargetError("CONNECTION_ERROR", message) from None

    async def stream(self, spec: RequestSpec, reply: Reply, seed: int) -> AsyncIterator[int]:
        payload = {"model": self.model_id, "max_tokens": spec.output_len, "stream": True,
                   "stream_options": {"include_usage": True}, "seed": seed}
        if self.path.endswith("/chat/completions"):          # text prompts only (checked by the command line)
            payload["messages"] = [{"role": "user", "content": spec.prompt}]
        else:
            payload["prompt"] = spec.prompt
        if self.sampling.temperature is not None:
            payload["temperature"] = self.sampling.temperature
        if self.sampling.ignore_eos:
            payload["ignore_eos"] = True
        payload.update(self.extra_body)
        try:
            async for data in self._http.post_sse(self.path, payload):
                if data.strip() == "[DONE]":
                    continue
                event = json.loads(data)
                if not isinstance(event, dict):
                    raise ValueError(f"event is not an object: {data[:100]}")
                _raise_for_error(event)
                if event.get("usage"):
                    reply.prompt_tokens = event["usage"].get("prompt_tokens")
                    reply.completion_tokens = event["usage"].get("completion_tokens")
                for choice in event.get("choices") or ():
                    if tokens := _tokens_in(choice):
                        yield tokens
        except HttpStatusError as err:
            raise TargetError(f"HTTP {err.status}", str(err)) from None
        except (OSError, asyncio.IncompleteReadError) as err:
            raise TargetError("CONNECTION_ERROR", repr(err)) from None
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise TargetError("PROTOCOL_ERROR", repr(err)) from None

    async def close(self) -> None:
        await self._http.close()


def _tokens_in(choice: dict) -> int:
    """Tokens in one streamed choice: its token ids when the server sends them, else 1 per non-empty text
    (a completion's ``text``, a chat chunk's ``delta.content``)."""
    if choice.get("token_ids") is not None:
        return len(choice["token_ids"])
    if (choice.get("logprobs") or {}).get("tokens") is not None:
        return len(choice["logprobs"]["tokens"])
    return 1 if choice.get("text") or (choice.get("delta") or {}).get("content") else 0


def _raise_for_error(event: dict) -> None:
    """vLLM and SGLang report a failure inside a started stream as ``{"error": {..., "code": 400}}``."""
    error = event.get("error")
    if error:
        code = error.get("code") if isinstance(error, dict) else None
        message = error.get("message", "") if isinstance(error, dict) else str(error)
        raise TargetError(f"HTTP {code}" if isinstance(code, int) else "STREAM_ERROR", message)
