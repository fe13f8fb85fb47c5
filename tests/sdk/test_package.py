"""The SDK as a package: what it imports, how it validates its settings, how it builds requests."""
import json
import subprocess
import sys

import grpc
import pytest

from epserve_client import CLIENT_DEFAULT, EpserveError, InvalidArgument, NotFound, Usage
from epserve_client import _wire
from epserve_client.errors import error_for, status_code

pytestmark = pytest.mark.unit


def test_imports_only_grpc_protobuf_and_stdlib():
    """Importing the SDK adds only its own, grpc, protobuf and stdlib modules; never torch or the server (epserve)."""
    code = (
        "import sys, json, grpc, google.protobuf; before = set(sys.modules); import epserve_client; "
        "print(json.dumps({'added': sorted(set(sys.modules) - before), 'all': sorted(sys.modules)}))"
    )
    out = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    foreign = [m for m in out["added"] if m.split(".")[0] not in sys.stdlib_module_names
               and m.split(".")[0] not in {"epserve_client", "grpc"} and not m.startswith(("google.protobuf", "google._upb"))]
    assert foreign == [] and "epserve_client.aio" in out["added"]
    assert not {m.split(".")[0] for m in out["all"]} & {"torch", "numpy", "epserve", "services", "kernels", "load_tests"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_retries=5), "max_retries must be in"),
    (dict(max_retries=-1), "max_retries must be in"),
    (dict(initial_backoff=0), "initial_backoff"),
    (dict(initial_backoff=3.0, max_backoff=2.0), "initial_backoff"),
    (dict(root_certificates=b"pem"), "without tls=True"),
])
def test_bad_settings_are_rejected(kwargs, match):
    base = dict(api_key=None, tls=False, root_certificates=None, timeout=1.0, max_retries=4,
                initial_backoff=0.1, max_backoff=2.0, options=())
    with pytest.raises(ValueError, match=match):
        _wire.settings("localhost:1", **{**base, **kwargs})


def test_service_config_retries_every_method_on_unavailable():
    settings = _wire.settings("h:1", api_key="k", tls=False, root_certificates=None, timeout=None, max_retries=3,
                              initial_backoff=0.05, max_backoff=1.5, options=(("grpc.lb_policy_name", "round_robin"),))
    options = dict(settings.options)
    assert options["grpc.enable_retries"] == 1 and options["grpc.lb_policy_name"] == "round_robin"
    (method_config,) = json.loads(options["grpc.service_config"])["methodConfig"]
    assert {n["method"] for n in method_config["name"]} == {"Generate", "GetModelInfo", "Abort"}
    assert method_config["retryPolicy"] == {"maxAttempts": 4, "initialBackoff": "0.05s", "maxBackoff": "1.5s",
                                            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}
    assert settings.metadata == (("authorization", "Bearer k"),)
    assert settings.deadline(CLIENT_DEFAULT) is None and settings.deadline(2.5) == 2.5


def test_prompt_type_decides_the_input_field():
    common = dict(max_tokens=4, temperature=None, top_p=None, top_k=None, seed=None, stop_token_ids=(), stop=(),
                  ignore_eos=False, logprobs=None, request_id=None)
    assert _wire.generate_request("hi", **common).WhichOneof("input") == "text"
    assert list(_wire.generate_request((3, 4), **common).token_ids.ids) == [3, 4]
    with pytest.raises(TypeError):
        _wire.generate_request(b"bytes", **common)
    with pytest.raises(TypeError):
        _wire.generate_request([1.5], **common)


def test_errors_keep_the_message_verbatim():
    error = error_for(status_code(grpc.StatusCode.INVALID_ARGUMENT.value[0]), "sampling.top_k: < 0", "r")
    assert type(error) is InvalidArgument and str(error) == "sampling.top_k: < 0" and error.request_id == "r"
    assert type(error_for(grpc.StatusCode.NOT_FOUND, "")) is NotFound
    assert type(error_for(status_code(999), "?")) is EpserveError and status_code(999) == grpc.StatusCode.UNKNOWN
    assert Usage(3, 4).total_tokens == 7
