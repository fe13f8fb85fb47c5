"""The OpenAI-compatible HTTP API of `epserve up`, through the official `openai` package."""
from __future__ import annotations

import json

import openai
import pytest

from tests.e2e.test_cluster import UpCluster
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e
KEY = "sk-test-key"
PROMPT = [5, 6, 7, 8, 9, 10]


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"{KEY}\n")
    cluster = UpCluster("tiny", attention=1, shards=2, redundant=2, flags=("--api-keys-file", str(keys)))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def client(up):
    from epserve.services.up_state import read_up_state

    with openai.OpenAI(base_url=read_up_state(up.state_file)["http_endpoint"], api_key=KEY, max_retries=0) as c:
        yield c


def greedy(client, **kwargs):
    return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True}, **kwargs)


def test_models_and_completions_streaming_and_not(client, up):
    assert [m.id for m in client.models.list()] == ["tiny"]
    whole = greedy(client)
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and len(choice.model_extra["token_ids"]) == 24
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(PROMPT), 24)
    from epserve_client import Client

    with Client(up.endpoint, api_key=KEY) as grpc_client:               # the same tokens as the gRPC API
        assert grpc_client.generate(PROMPT, max_tokens=24, temperature=0, ignore_eos=True).token_ids == \
            choice.model_extra["token_ids"]
    chunks = list(greedy(client, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_streaming_and_not_and_seeded_sampling(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens <= 16
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == whole.choices[0].message.content
    sampled = [client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=1.0, seed=7,
                                              extra_body={"ignore_eos": True, "return_token_ids": True})
               for _ in range(2)]
    assert sampled[0].choices[0].model_extra["token_ids"] == sampled[1].choices[0].model_extra["token_ids"]


def test_stop_strings_end_the_text_across_token_boundaries(client):
    text = greedy(client).choices[0].text
    start = next(i for i in range(2, len(text) - 2) if "\ufffd" not in text[i:i + 2] and text[i:i + 2] not in text[:i])
    stop = text[start:start + 2]                                 # most likely two tokens: across a boundary
    for stream in (False, True):
        result = greedy(client, stop=["never-there", stop], stream=stream)
        if stream:
            chunks = list(result)
            got = "".join(c.choices[0].text for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            got, reason = result.choices[0].text, result.choices[0].finish_reason
        assert (got, reason) == (text[:start], "stop")


@pytest.mark.parametrize("kwargs, error, param", [
    (dict(top_p=1.5), openai.BadRequestError, "top_p"),
    (dict(max_tokens=0), openai.BadRequestError, "max_tokens"),
    (dict(n=2), openai.BadRequestError, "n"),
    (dict(logprobs=2), openai.BadRequestError, "logprobs"),
    (dict(model="gpt-4"), openai.NotFoundError, "model"),
    (dict(prompt=[]), openai.BadRequestError, "prompt"),
])
def test_bad_requests_get_openai_errors_naming_the_field(client, kwargs, error, param):
    args = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, **kwargs}
    with pytest.raises(error) as raised:
        client.completions.create(**args)
    assert raised.value.body["param"] == param and param in raised.value.body["message"]


def test_a_bad_key_is_401_and_the_cluster_keeps_serving(client, up):
    from epserve.services.up_state import read_up_state

    with openai.OpenAI(base_url=read_up_state(up.state_file)["http_endpoint"], api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="tiny", prompt=PROMPT, max_tokens=4)
    assert greedy(client).usage.completion_tokens == 24


def test_a_client_that_goes_away_frees_its_kv(client, up):
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=400, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    wait_until(lambda: all(up.replica_load(r).kv_blocks_used == 0 for r in up.registry.live("attention")), 60,
               "the abandoned request's KV freed")


def test_the_load_test_harness_measures_chat_completions(up, tmp_path):
    """`epserve loadtest run --target openai --path /v1/chat/completions` against epserve's own HTTP API."""
    from epserve.load_tests.cli import main
    from epserve.services.up_state import read_up_state

    dataset = tmp_path / "chat.json"
    assert main(["sharegpt", "--num", "20", "--out", str(dataset)]) == 0
    base_url = read_up_state(up.state_file)["http_endpoint"].removesuffix("/v1")
    assert main(["run", "--target", "openai", "--endpoint", base_url, "--path", "/v1/chat/completions",
                 "--api-key", KEY, "--workload", "sharegpt", "--dataset", str(dataset), "--output-len", "8",
                 "--ignore-eos", "--request-rate", "20", "--num-prompts", "8", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("openai-*.json")
    result = json.loads(path.read_text())
    assert (result["completed"], result["failed"]) == (8, 0) and result["total_output_tokens"] == 64
