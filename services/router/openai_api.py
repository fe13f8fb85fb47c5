"""The OpenAI-compatible HTTP API, served by the router next to gRPC (FastAPI on uvicorn, on the router's
gRPC event loop).

``/v1/completions`` and ``/v1/chat/completions`` (streaming as server-sent events, with
``stream_options.include_usage``), ``/v1/models``, ``/health``. A request becomes a
``GenerateRequest`` and runs through ``GenerationServicer.Generate`` itself (validation, admission,
the Redis record, replica resume, stop strings): HTTP and gRPC behave alike. ``logprobs`` (completions:
an int, the legacy shape) and ``logprobs: true`` with ``top_logprobs`` (chat) come in OpenAI's shapes
(``openai_logprobs``); ``n`` > 1 is refused with a 400 naming the field (not implemented). Errors
use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the HTTP status of the
gRPC status (400, 401, 404, 409, 429, 503, 504, 500).
"""
from __future__ import annotations

import hmac
import json
import math
import re
import time
import uuid
from dataclasses import dataclass

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from epserve.services.engine.params import MAX_LOGPROBS
from epserve.services.params import FINISH_REASON_NAMES
from epserve.services.proto import generation_pb2
from epserve.services.router.chat import ChatTemplate
from epserve.services.router.openai_logprobs import LogprobsFormat

HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
               grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
               grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
               grpc.StatusCode.DEADLINE_EXCEEDED: 504}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               409: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")         # clients send fields we do not use (user, ...)

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False
    return_token_ids: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[int]
    logprobs: int | None = None


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=_error_body(self.status, self.message, self.param),
                            headers=self.headers)


def _error_body(status: int, message: str, param: str | None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "internal_error"), "param": param,
                      "code": None}}


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details

    def api_error(self, prompt_field: str) -> ApiError:
        """As OpenAI names things: sampling.top_p -> top_p, the prompt's token ids -> ``prompt_field``."""
        field = self.details.split(":", 1)[0] if ":" in self.details else ""
        param = None if " " in field or not field else field.removeprefix("sampling.")
        details = self.details.removeprefix("sampling.")
        if param in ("token_ids", "text", "input"):
            param = prompt_field
            details = f"{prompt_field}:{self.details.split(':', 1)[1]}"
        retry = re.search(r"retry after ([0-9.]+) s", details)
        headers = {"retry-after": str(math.ceil(float(retry.group(1))))} if retry else None
        return ApiError(HTTP_STATUS.get(self.code, 500), details, param, headers)


class HttpContext:
    """The part of a gRPC servicer context ``Generate`` uses, for a call that came over HTTP."""

    def __init__(self, timeout_s: float | None, authorization: str):
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._metadata = (("authorization", authorization),)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def abort(self, code: grpc.StatusCode, details: str):
        raise _Abort(code, details)

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())


@dataclass
class OpenAIApi:
    servicer: object                  # GenerationServicer
    model_name: str
    chat_template: ChatTemplate
    api_keys: list[str] | None
    timeout_s: float | None = 600.0

    def app(self) -> FastAPI:
        app = FastAPI(title="epserve", docs_url=None, redoc_url=None)
        app.add_exception_handler(ApiError, lambda _, err: err.response())
        app.add_exception_handler(RequestValidationError, _validation_error)
        app.get("/health")(lambda: {"status": "ok"})
        app.get("/v1/models")(self.models)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat_completions)
        return app

    def _authorise(self, request: Request) -> None:
        if self.api_keys is None:
            return
        header = request.headers.get("authorization", "")
        token = header[len("Bearer "):].encode() if header.startswith("Bearer ") else b""
        if not any(hmac.compare_digest(token, key.encode()) for key in self.api_keys):
            raise ApiError(401, "authorization: a valid 'Bearer <api key>' is required")

    async def models(self, request: Request) -> dict:
        self._authorise(request)
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "epserve"}]}

    async def completions(self, body: CompletionRequest, request: Request):
        self._authorise(request)
        generate = self._request(body, body.max_tokens if body.max_tokens is not None else 16, body.logprobs)
        prompt = self.servicer.tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else body.prompt
        generate.token_ids.ids.extend(prompt)
        return await self._respond(body, generate, request, chat=False)

    async def chat_completions(self, body: ChatRequest, request: Request):
        self._authorise(request)
        try:
            text = self.chat_template.render([m.model_dump() for m in body.messages])
        except Exception as err:                           # noqa: BLE001 - a template error names the input
            raise ApiError(400, f"messages: the chat template cannot render them: {err}", "messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        generate = self._request(body, max_tokens if max_tokens is not None else 256, _chat_logprobs(body))
        generate.token_ids.ids.extend(self.servicer.tokenizer.encode(text, add_bos=not self.chat_template.own))
        return await self._respond(body, generate, request, chat=True)

    def _request(self, body: _Sampling, max_tokens: int, logprobs: int | None) -> generation_pb2.GenerateRequest:
        if body.model != self.model_name:
            raise ApiError(404, f"model: {body.model!r} is not served here (GET /v1/models lists {self.model_name!r})",
                           "model")
        if body.n != 1:
            raise ApiError(400, f"n: only 1 choice per request is supported, got {body.n}", "n")
        sampling = generation_pb2.SamplingParams(max_tokens=max_tokens, stop_token_ids=body.stop_token_ids,
                                                 ignore_eos=body.ignore_eos, temperature=body.temperature,
                                                 top_p=body.top_p, top_k=body.top_k, seed=body.seed, logprobs=logprobs)
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        return generation_pb2.GenerateRequest(request_id=uuid.uuid4().hex, sampling=sampling, stop=stops)

    async def _respond(self, body: _Sampling, generate: generation_pb2.GenerateRequest, request: Request, chat: bool):
        context = HttpContext(self.timeout_s, request.headers.get("authorization", ""))
        run = _Run(self.servicer.Generate(generate, context), len(generate.token_ids.ids),
                   "messages" if chat else "prompt")
        first = await run.start()                       # errors before the first token become HTTP errors
        logprobs = LogprobsFormat(self.servicer.tokenizer, chat) if generate.sampling.HasField("logprobs") else None
        shape = _Shape(chat, generate.request_id, self.model_name, body.return_token_ids, logprobs)
        if not body.stream:
            whole = _Part(first.text, list(first.token_ids), list(first.logprobs))
            try:
                async for part in run.rest():
                    whole.text += part.text
                    whole.token_ids += part.token_ids
                    whole.logprobs += part.logprobs
            except _Abort as abort:
                raise abort.api_error(run.prompt_field) from None
            return shape.whole(whole, run)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(shape.events(first, run, include_usage), media_type="text/event-stream")


def _chat_logprobs(body: ChatRequest) -> int | None:
    """The engine's ``logprobs`` of a chat request: None, or ``top_logprobs`` (0 when not given)."""
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_LOGPROBS:
        raise ApiError(400, f"top_logprobs: must be an integer in [0, {MAX_LOGPROBS}], got {body.top_logprobs}",
                       "top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


@dataclass
class _Part:
    text: str
    token_ids: list[int]
    logprobs: list                     # generation_pb2.TokenLogprobs, one per token when asked


class _Run:
    """One generation's responses as text parts (stop strings applied by ``Generate``); then its finish
    reason and usage."""

    def __init__(self, responses, prompt_tokens: int, prompt_field: str):
        self.responses, self.prompt_field = responses, prompt_field
        self.finish_reason, self.prompt_tokens, self.completion_tokens = "length", prompt_tokens, 0
        self._done = False

    async def start(self) -> _Part:
        try:
            return await self._next()
        except _Abort as abort:
            raise abort.api_error(self.prompt_field) from None

    async def rest(self):
        while not self._done:
            yield await self._next()

    async def close(self) -> None:
        """End the generation if it still runs (the client went away): the replica aborts it."""
        await self.responses.aclose()

    async def _next(self) -> _Part:
        response = await self.responses.__anext__()
        kind = response.WhichOneof("response")
        if kind == "error":
            await self.responses.aclose()
            raise _Abort(next(c for c in grpc.StatusCode if c.value[0] == response.error.code), response.error.message)
        if kind == "complete":
            self._done = True
            done = response.complete
            self.finish_reason = FINISH_REASON_NAMES.get(done.finish_reason, "stop")
            self.prompt_tokens, self.completion_tokens = done.usage.prompt_tokens, done.usage.completion_tokens
            return _Part("", [], [])
        self.completion_tokens += len(response.chunk.token_ids)
        chunk = response.chunk
        return _Part(chunk.text, list(chunk.token_ids), list(chunk.logprobs))

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass
class _Shape:
    """OpenAI's response objects for completions or chat."""

    chat: bool
    request_id: str
    model: str
    return_token_ids: bool
    logprobs: LogprobsFormat | None

    def _base(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": ("chatcmpl-" if self.chat else "cmpl-") + self.request_id, "object": kind,
                "created": int(time.time()), "model": self.model}

    def _choice(self, part: _Part, finish_reason: str | None, chunk: bool) -> dict:
        logprobs = self.logprobs.format(part.token_ids, part.logprobs) if self.logprobs else None
        if not self.chat:
            choice = {"index": 0, "text": part.text, "logprobs": logprobs, "finish_reason": finish_reason}
        elif chunk:
            choice = {"index": 0, "delta": {"content": part.text} if part.text else {}, "logprobs": logprobs,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": part.text}, "logprobs": logprobs,
                      "finish_reason": finish_reason}
        if self.return_token_ids:
            choice["token_ids"] = part.token_ids
        return choice

    def whole(self, part: _Part, run: _Run) -> dict:
        return {**self._base(False), "choices": [self._choice(part, run.finish_reason, False)], "usage": run.usage()}

    async def events(self, first: _Part, run: _Run, include_usage: bool):
        def event(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        if self.chat:
            yield event({**self._base(True), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                          "logprobs": None, "finish_reason": None}]})
        try:
            parts = [first]
            async for part in run.rest():
                parts.append(part)
                while len(parts) > 1:
                    sent = parts.pop(0)
                    if sent.text or ((self.return_token_ids or self.logprobs) and sent.token_ids):
                        yield event({**self._base(True), "choices": [self._choice(sent, None, True)]})
            yield event({**self._base(True), "choices": [self._choice(parts[0], run.finish_reason, True)]})
            if include_usage:
                yield event({**self._base(True), "choices": [], "usage": run.usage()})
        except _Abort as abort:
            error = abort.api_error(run.prompt_field)
            yield event(_error_body(error.status, error.message, error.param))
        finally:
            await run.close()
        yield "data: [DONE]\n\n"


async def _validation_error(_, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"] if p != "body")
    return ApiError(400, f"{field}: {first['msg']}", field).response()
