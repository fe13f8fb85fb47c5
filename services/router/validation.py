"""Edge validation of public GenerateRequests: every field checked, errors name the field."""
from __future__ import annotations

from dataclasses import dataclass

from epserve.services.engine.params import InvalidParam, SamplingParams
from epserve.services.engine.tokenizer import Tokenizer
from epserve.services.params import sampling_from_proto
from epserve.services.proto import generation_pb2

MAX_REQUEST_ID_CHARS = 128
MAX_STOP_TOKEN_IDS = 64
MAX_STOPS, MAX_STOP_CHARS = 16, 256          # stop strings per request, characters per stop string


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_context: int                 # prompt + generated tokens
    max_request_bytes: int = 4 << 20


def validate_request(request: generation_pb2.GenerateRequest, tokenizer: Tokenizer,
                     limits: Limits) -> tuple[list[int], SamplingParams]:
    """-> (prompt token ids, sampling params); raises InvalidParam naming the field."""
    size = request.ByteSize()
    if size > limits.max_request_bytes:
        field = request.WhichOneof("input") or "request"
        raise InvalidParam(field, f"request of {size} bytes exceeds the limit of {limits.max_request_bytes}")
    if len(request.request_id) > MAX_REQUEST_ID_CHARS or not request.request_id.isprintable():
        raise InvalidParam("request_id", f"must be printable and at most {MAX_REQUEST_ID_CHARS} characters")
    prompt = _prompt_ids(request, tokenizer, limits)
    if not request.HasField("sampling"):
        raise InvalidParam("sampling", "is required (sampling.max_tokens at least)")
    if len(request.sampling.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidParam("sampling.stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids, got "
                                                      f"{len(request.sampling.stop_token_ids)}")
    if len(request.stop) > MAX_STOPS or any(len(stop) > MAX_STOP_CHARS for stop in request.stop):
        raise InvalidParam("stop", f"at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters")
    try:
        params = sampling_from_proto(request.sampling)
        params.validate(vocab_size=limits.vocab_size, max_new_tokens_allowed=limits.max_context - len(prompt))
    except InvalidParam as err:
        raise InvalidParam(f"sampling.{err.field}", str(err).split(": ", 1)[1]) from None
    return prompt, params


def _prompt_ids(request, tokenizer: Tokenizer, limits: Limits) -> list[int]:
    which = request.WhichOneof("input")
    if which is None:
        raise InvalidParam("input", "one of text or token_ids is required")
    if which == "text":
        if not request.text:
            raise InvalidParam("text", "must not be empty")
        prompt = tokenizer.encode(request.text)
    else:
        prompt = list(request.token_ids.ids)
        if not prompt:
            raise InvalidParam("token_ids", "must not be empty")
        bad = next((t for t in prompt if not 0 <= t < limits.vocab_size), None)
        if bad is not None:
            raise InvalidParam("token_ids", f"every id must be in [0, {limits.vocab_size}), got {bad}")
    if len(prompt) >= limits.max_context:
        raise InvalidParam(which, f"prompt of {len(prompt)} tokens leaves no room in the context of {limits.max_context}")
    return prompt
