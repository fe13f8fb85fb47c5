"""The OpenAI-compatible HTTP API of `epserve up`, through the official `openai` package; and, on the same
cluster, the gRPC API's logprobs and stop strings through the SDK."""
from __future__ import annotations

import json

import grpc
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


def two_char_stop(text: str) -> int:
    """Where a stop string of two characters starts in ``text`` (most likely two tokens: across a boundary)."""
    return next(i for i in range(2, len(text) - 2) if "\ufffd" not in text[i:i + 2] and text[i:i + 2] not in text[:i])


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
    start = two_char_stop(text)
    stop = text[start:start + 2]
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
    (dict(logprobs=21), openai.BadRequestError, "logprobs"),
    (dict(stop=[str(i) for i in range(17)]), openai.BadRequestError, "stop"),
    (dict(model="gpt-4"), openai.NotFoundError, "model"),
    (dict(prompt=[]), openai.BadRequestError, "prompt"),
])
def test_bad_requests_get_openai_errors_naming_the_field(client, kwargs, error, param):
    args = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, **kwargs}
    with pytest.raises(error) as raised:
        client.completions.create(**args)
    assert raised.value.body["param"] == param and param in raised.value.body["message"]


@pytest.mark.parametrize("kwargs", [dict(top_logprobs=2), dict(logprobs=False, top_logprobs=2),
                                    dict(logprobs=True, top_logprobs=21)])
def test_bad_chat_logprobs_name_top_logprobs(client, kwargs):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       **kwargs)
    assert raised.value.body["param"] == "top_logprobs" and "top_logprobs" in raised.value.body["message"]


def test_completion_logprobs_streaming_and_not_match_the_grpc_api(client, up):
    whole = greedy(client, logprobs=3).choices[0]
    lp = whole.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 24
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(24)]
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):   # greedy: the chosen token is the most probable
        assert chosen <= 0 and 0 < len(top) <= 3 and max(top.values()) == pytest.approx(chosen)
    streamed = [c.choices[0].logprobs for c in greedy(client, logprobs=3, stream=True) if c.choices]
    assert sum((s.token_logprobs for s in streamed), []) == lp.token_logprobs
    assert sum((s.text_offset for s in streamed), []) == lp.text_offset
    from epserve_client import Client

    with Client(up.endpoint, api_key=KEY) as grpc_client:
        result = grpc_client.generate(PROMPT, max_tokens=24, temperature=0, ignore_eos=True, logprobs=3)
    assert [t.token_id for t in result.logprobs] == result.token_ids == whole.model_extra["token_ids"]
    assert [t.logprob for t in result.logprobs] == lp.token_logprobs
    assert all(len(t.top) == 3 and t.top[0] == (t.token_id, t.logprob) for t in result.logprobs)


def test_chat_logprobs_streaming_and_not(client):
    messages = [{"role": "user", "content": "Hello there"}]
    args = dict(model="tiny", messages=messages, max_tokens=12, temperature=0.8, seed=3, logprobs=True, top_logprobs=2,
                extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**args).choices[0]
    content = whole.logprobs.content
    assert len(content) == 12
    joined = bytes(b for entry in content for b in entry.bytes)           # each token's own bytes
    assert joined.decode("utf-8", errors="replace") == whole.message.content
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= max(entry.top_logprobs[1].logprob, entry.logprob) - 1e-6
    streamed = [c.choices[0].logprobs for c in client.chat.completions.create(stream=True, **args) if c.choices]
    assert [e.logprob for s in streamed if s for e in s.content] == [e.logprob for e in content]
    plain = client.chat.completions.create(**{**args, "logprobs": True, "top_logprobs": None}).choices[0]
    assert [e.top_logprobs for e in plain.logprobs.content] == [[]] * 12
    off = client.chat.completions.create(**{**args, "logprobs": None, "top_logprobs": None}).choices[0]
    assert off.logprobs is None


def test_grpc_stop_strings_and_bad_values(up):
    from epserve_client import Client, InvalidArgument

    with Client(up.endpoint, api_key=KEY) as grpc_client:
        full = grpc_client.generate(PROMPT, max_tokens=24, temperature=0, ignore_eos=True)
        text = full.text
        start = two_char_stop(text)
        stop = text[start:start + 2]
        stream = grpc_client.stream(PROMPT, max_tokens=24, temperature=0, ignore_eos=True, stop=["never", stop],
                                    logprobs=0)
        chunks = list(stream)
        result = stream.result
        assert (result.text, "".join(c.text for c in chunks), result.finish_reason) == (text[:start], text[:start],
                                                                                      "stop")
        kept = len(result.token_ids)                        # up to the token that completes the stop string
        assert result.token_ids == full.token_ids[:kept] and stop in full.text and kept < 24
        assert stop not in result.text and stop in grpc_client.generate(
            PROMPT, max_tokens=kept, temperature=0, ignore_eos=True).text
        assert len(result.logprobs) == kept and result.usage.completion_tokens == kept
        for kwargs, field in ((dict(logprobs=21), "sampling.logprobs"), (dict(stop=["x"] * 17), "stop"),
                              (dict(stop=["y" * 257]), "stop")):
            with pytest.raises(InvalidArgument, match=f"^{field}: "):
                grpc_client.generate(PROMPT, max_tokens=4, **kwargs)


def test_a_resumed_stream_replays_logged_tokens_with_their_logprobs_up_to_the_stop_string(up):
    """A retry of a finished request's id with ``resume_from`` replays its token log: with the logprobs
    the first stream had, and ending where the stop string ended it (the log may go on past it)."""
    from epserve_client import Client
    from epserve_client._proto import generation_pb2 as pb
    from epserve_client._proto.generation_pb2_grpc import GenerationServiceStub

    from epserve.services.cluster.requests import RequestStore
    from epserve.services.router.auth import namespaced, tenant_of

    metadata = (("authorization", f"Bearer {KEY}"),)
    store = RequestStore(up.redis, up.registry.keys)
    with Client(up.endpoint, api_key=KEY) as grpc_client:
        text = grpc_client.generate(PROMPT, max_tokens=24, temperature=0, ignore_eos=True).text
        start = two_char_stop(text)
        stop = text[start:start + 2]
        for request_id, stops, resume_from in (("lp-resume", [], 3), ("stop-resume", [stop], 0)):
            first = grpc_client.generate(PROMPT, max_tokens=24, temperature=0, ignore_eos=True, logprobs=2,
                                         stop=stops, request_id=request_id)
            record_id = namespaced(tenant_of(metadata), request_id)
            wait_until(lambda: store.get(record_id).state == "finished", 30, "the request recorded finished")
            request = pb.GenerateRequest(request_id=request_id, token_ids=pb.TokenIds(ids=PROMPT), stop=stops,
                                         resume_from=resume_from, sampling=pb.SamplingParams(
                                             max_tokens=24, temperature=0, ignore_eos=True, logprobs=2))
            with grpc.insecure_channel(up.endpoint) as channel:
                replay, complete = GenerationServiceStub(channel).Generate(request, metadata=metadata, timeout=30)
            assert list(replay.chunk.token_ids) == first.token_ids[resume_from:] == list(complete.complete.token_ids)[
                resume_from:]
            assert [lp.logprob for lp in replay.chunk.logprobs] == [lp.logprob for lp in first.logprobs[resume_from:]]
            assert [list(lp.top_token_ids) for lp in replay.chunk.logprobs] == [
                [t for t, _ in lp.top] for lp in first.logprobs[resume_from:]]
            assert complete.complete.text == first.text
        assert first.finish_reason == "stop" and complete.complete.finish_reason == pb.FINISH_REASON_STOP
        assert replay.chunk.text == first.text == text[:start]


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
