"""API keys as tenants under `epserve up`: each key's request ids are its own, only the owner may abort or
resume a request, and a key over its rate limit is refused (gRPC RESOURCE_EXHAUSTED, HTTP 429 with
Retry-After) while other keys are served."""
from __future__ import annotations

import openai
import pytest
from epserve_client import Client, ResourceExhausted

from epserve.services.cluster.requests import RequestStore
from epserve.services.router.auth import namespaced, tenant_of
from epserve.services.up_state import read_up_state
from tests.e2e.test_cluster import UpCluster
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e
KEYS = ("key-a", "key-b", "key-c", "key-d")
PROMPT = [5, 6, 7, 8]
BURST = 4


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("\n".join(KEYS) + "\n")
    cluster = UpCluster("tiny", attention=1, shards=2, redundant=2, flags=(
        "--api-keys-file", str(keys), "--rate-limit", "0.05", "--rate-burst", str(BURST)))
    yield cluster
    cluster.stop()


def tenant(key: str) -> str:
    return tenant_of([("authorization", f"Bearer {key}")])


def test_two_keys_use_one_id_and_only_the_owner_may_abort(up):
    store = RequestStore(up.redis, up.registry.keys)
    with Client(up.endpoint, api_key="key-a") as a, Client(up.endpoint, api_key="key-b") as b:
        stream = a.stream(PROMPT, max_tokens=400, temperature=0, ignore_eos=True, request_id="same")
        chunks = iter(stream)
        first = next(chunks).token_ids                                      # running under key a
        assert b.abort("same") is False                                     # not b's request
        short = b.generate(PROMPT, max_tokens=8, temperature=0, ignore_eos=True, request_id="same")
        assert short.request_id == "same" and len(short.token_ids) == 8     # b's own "same"
        tokens = first + [t for chunk in chunks for t in chunk.token_ids]
        assert tokens == stream.result.token_ids and len(tokens) == 400 and tokens[:8] == short.token_ids
    emitted = lambda: {key: store.get(namespaced(tenant(key), "same")).emitted for key in ("key-a", "key-b")}  # noqa: E731
    wait_until(lambda: emitted() == {"key-a": 400, "key-b": 8}, 30, "both token logs written", state=emitted)
    assert store.get("same") is None                                        # no id outside a namespace


def test_another_key_cannot_resume_a_request(up):
    store = RequestStore(up.redis, up.registry.keys)
    with Client(up.endpoint, api_key="key-a") as a, Client(up.endpoint, api_key="key-b") as b:
        a.generate(PROMPT, max_tokens=6, temperature=0, ignore_eos=True, request_id="mine")
        mine = namespaced(tenant("key-a"), "mine")                     # the router records the end after the
        before = wait_until(lambda: (r := store.get(mine)).state == "finished" and r, 30,   # client saw it
                            "the request's record to end", state=lambda: store.get(mine))
        b.generate(PROMPT, max_tokens=3, temperature=0, ignore_eos=True, request_id="mine")    # its own request
    assert store.get(namespaced(tenant("key-a"), "mine")) == before


def test_a_key_over_its_rate_limit_is_refused_and_others_are_served(up):
    with Client(up.endpoint, api_key="key-c", max_retries=0) as c, Client(up.endpoint, api_key="key-d") as d:
        first = c.generate(PROMPT, max_tokens=2, temperature=0, request_id="c-first")
        for _ in range(BURST - 1):
            c.generate(PROMPT, max_tokens=2, temperature=0)
        with pytest.raises(ResourceExhausted, match=r"rate limit: .* retry after [0-9.]+ s"):
            c.generate(PROMPT, max_tokens=2, temperature=0)
        again = c.generate(PROMPT, max_tokens=2, temperature=0, request_id="c-first")   # a resume: not counted
        assert again.token_ids == first.token_ids
        assert len(d.generate(PROMPT, max_tokens=2, temperature=0).token_ids) == 2
    base_url = read_up_state(up.state_file)["http_endpoint"]
    with openai.OpenAI(base_url=base_url, api_key="key-c", max_retries=0) as over:
        with pytest.raises(openai.RateLimitError) as error:
            over.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
        assert int(error.value.response.headers["retry-after"]) >= 1
