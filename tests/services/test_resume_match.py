"""Which call may resume an existing request record (the router's ``_same_request``), records of older routers
included."""
import pytest

from epserve.services.cluster.requests import RequestRecord
from epserve.services.engine.params import SamplingParams
from epserve.services.proto import generation_pb2
from epserve.services.router.service import _params_dict, _same_request

pytestmark = pytest.mark.unit
PROMPT = [5, 6, 7]


def _record(sampling: dict, seed: int = 11) -> RequestRecord:
    return RequestRecord("r", "running", "attention-0", PROMPT, sampling, seed)


def test_the_same_call_resumes_and_another_does_not():
    params, request = SamplingParams(max_tokens=8, temperature=0), generation_pb2.GenerateRequest(stop=["x"])
    record = _record(_params_dict(params, request))
    assert _same_request(record, PROMPT, params, request)
    assert not _same_request(None, PROMPT, params, request)
    assert not _same_request(record, [5, 6], params, request)
    assert not _same_request(record, PROMPT, SamplingParams(max_tokens=9, temperature=0), request)
    assert not _same_request(record, PROMPT, params, generation_pb2.GenerateRequest(stop=["y"]))
    assert not _same_request(record, PROMPT, SamplingParams(max_tokens=8, temperature=0, seed=12), request)


def test_a_record_of_a_router_before_logprobs_and_stop_strings_still_resumes():
    params, request = SamplingParams(max_tokens=8, temperature=0), generation_pb2.GenerateRequest()
    old = {k: v for k, v in _params_dict(params, request).items() if k not in ("logprobs", "stop")}
    assert _same_request(_record(old), PROMPT, params, request)
    assert not _same_request(_record(old), PROMPT, params, generation_pb2.GenerateRequest(stop=["x"]))
