"""A client's stream outlives its router: the SDK resumes it on the restarted router, which continues it from
the Redis record and token log; and a call with an existing request id is a resume, never ALREADY_EXISTS."""
from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor, wait

import grpc
import pytest
import torch
from epserve_client import Client, EpserveError

from epserve.services.cluster.requests import RequestStore
from epserve.services.engine.engine import EngineConfig, LLMEngine
from epserve.services.engine.params import SamplingParams
from epserve.services.proto import generation_pb2, generation_pb2_grpc
from epserve.services.up_state import find_service, read_up_state
from tests.e2e.test_cluster import PROMPTS, UpCluster, generate_concurrently
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e
MAX_TOKENS = 160
STREAM_TIMEOUT_S = 180       # a stream's deadline: a stall fails the test (showing the records) 30 s before it


@pytest.fixture(scope="module")
def model_dir(hf_checkpoints):
    return hf_checkpoints["groups_yarn"]


@pytest.fixture(scope="module")
def want(model_dir):
    engine = LLMEngine.from_path(model_dir, EngineConfig(block_size=16, num_kv_blocks=512, micro_batches=1),
                                 dtype=torch.float32)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return [s.output_ids for s in engine.generate(PROMPTS, params)]


@pytest.fixture(scope="module")
def up(model_dir):
    cluster = UpCluster(model_dir, attention=1, shards=2, redundant=0)
    yield cluster
    cluster.stop()


def test_sigkill_of_the_router_mid_generation_loses_no_request(up, want):
    """16 concurrent greedy streams; the router is SIGKILLed while they run and `epserve up` restarts it. Each
    stream gets every token once, the single-process engine's; every record ends finished with a TTL; every
    KV block is free afterwards."""
    store = RequestStore(up.redis, up.registry.keys)
    pid = up.service_pid("router", "router-0")

    def stream(i: int) -> list[int]:
        with Client(up.endpoint, timeout=STREAM_TIMEOUT_S) as client:
            s = client.stream(PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, request_id=f"rk-{i}")
            received = [token for chunk in s for token in chunk.token_ids]
            assert received == s.result.token_ids
            return received

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(stream, i) for i in range(len(PROMPTS))]
        records = lambda: [store.get(f"rk-{i}") for i in range(len(PROMPTS))]   # noqa: E731
        wait_until(lambda: all(r is not None and r.emitted > 0 for r in records()), 60, "every stream under way",
                   state=lambda: [r and r.emitted for r in records()])
        os.kill(pid, signal.SIGKILL)
        assert not all(f.done() for f in futures)
        assert not wait(futures, timeout=STREAM_TIMEOUT_S - 30).not_done, stalled(up, futures, records())
        got = [f.result() for f in futures]
    assert got == want
    assert find_service(read_up_state(up.state_file), "router", "router-0")["restarts"] == 1
    up.wait_requests_ended([f"rk-{i}" for i in range(len(PROMPTS))])


def greedy_request(request_id: str, prompt: list[int], resume_from: int = 0) -> generation_pb2.GenerateRequest:
    """The gRPC request of a greedy generation of MAX_TOKENS (a resume after ``resume_from`` tokens)."""
    return generation_pb2.GenerateRequest(
        request_id=request_id, token_ids=generation_pb2.TokenIds(ids=prompt), resume_from=resume_from,
        sampling=generation_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))


def stalled(up, futures, records) -> str:
    """What a test whose streams did not end shows: each unfinished stream's record and the replicas' load."""
    lines = [f"stream {i}: {r and (r.state, r.owner, r.emitted)}" for i, (f, r) in enumerate(zip(futures, records))
             if not f.done()]
    loads = [str(up.replica_load(replica)).replace("\n", " ") for replica in up.registry.live("attention")]
    return "streams that did not end: " + "; ".join(lines + loads)


def test_a_call_with_an_existing_id_resumes_it(up, want):
    """The same id again: a finished request replays from ``resume_from``; another prompt under it is refused."""
    with Client(up.endpoint, timeout=120) as client:
        first = client.generate(PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, request_id="again")
        again = client.generate(PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, request_id="again")
        assert first.token_ids == again.token_ids == want[1] and again.finish_reason == "length"
        with pytest.raises(EpserveError, match="another prompt") as error:
            client.generate(PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, request_id="again")
        assert error.value.code == grpc.StatusCode.ALREADY_EXISTS
    request = greedy_request("again", PROMPTS[1], resume_from=150)
    with grpc.insecure_channel(up.endpoint) as channel:
        responses = list(generation_pb2_grpc.GenerationServiceStub(channel).Generate(request, timeout=60))
        assert [list(r.chunk.token_ids) for r in responses[:-1]] == [want[1][150:]]
        assert list(responses[-1].complete.token_ids) == want[1]
        request.resume_from = MAX_TOKENS + 1
        with pytest.raises(grpc.RpcError, match="resume_from"):
            list(generation_pb2_grpc.GenerationServiceStub(channel).Generate(request, timeout=60))


def test_a_resume_while_the_earlier_call_still_runs_on_the_router_takes_the_request_over(up, want):
    """A client reconnects with its request id while the router still relays the call it lost (the router has not
    seen that connection go): the new call takes the request over and gets every token once; the earlier call ends
    ABORTED, leaving the request's record and its new run alone (before, its end aborted the new run, whose
    stream then waited for its deadline without a token)."""
    request = greedy_request("taken", PROMPTS[3])
    options = [("grpc.use_local_subchannel_pool", 1)]                     # two connections, as two clients have
    with grpc.insecure_channel(up.endpoint, options=options) as lost, \
            grpc.insecure_channel(up.endpoint, options=options) as again:
        earlier = generation_pb2_grpc.GenerationServiceStub(lost).Generate(request, timeout=120)
        received = []
        for response in earlier:
            received += response.chunk.token_ids
            if len(received) >= 5:
                break
        request.resume_from = len(received)
        later = generation_pb2_grpc.GenerationServiceStub(again).Generate(request, timeout=120)
        first = next(later)
        with pytest.raises(grpc.RpcError) as ended:
            list(earlier)
        assert ended.value.code() == grpc.StatusCode.ABORTED and "taken over" in ended.value.details()
        responses = [first, *later]
    assert received + [t for r in responses[:-1] for t in r.chunk.token_ids] == want[3]
    assert list(responses[-1].complete.token_ids) == want[3]
    up.wait_requests_ended(["taken"])


def test_a_resume_of_a_run_that_ended_unrecorded_replays_its_log_to_the_end(up, want):
    """The replica ended a run (its log holds every token), and its router went away before it recorded the end:
    a resume replays the log and completes the request (before, it was resubmitted, the replica refused tokens
    past max_tokens, and the stream failed with INVALID_ARGUMENT)."""
    store = RequestStore(up.redis, up.registry.keys)
    with Client(up.endpoint, timeout=120) as client:
        assert client.generate(PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True,
                               request_id="unrecorded").token_ids == want[2]
        store.reopen("unrecorded")                       # open, as a router that died before recording the end
    request = greedy_request("unrecorded", PROMPTS[2], resume_from=150)
    with grpc.insecure_channel(up.endpoint) as channel:
        responses = list(generation_pb2_grpc.GenerationServiceStub(channel).Generate(request, timeout=60))
    assert [list(r.chunk.token_ids) for r in responses[:-1]] == [want[2][150:]]
    assert list(responses[-1].complete.token_ids) == want[2]
    assert responses[-1].complete.finish_reason == generation_pb2.FINISH_REASON_LENGTH
    up.wait_requests_ended(["unrecorded"])


def test_sigkill_of_the_only_replica_loses_no_request(up, want):
    """One replica, SIGKILLed mid-generation: `epserve up` restarts it, and the router resubmits every open
    request to it with the tokens streamed so far; every stream gets the single-process tokens once."""
    kill = lambda: os.kill(up.service_pid("attention", "attention-0"), signal.SIGKILL)   # noqa: E731
    restarts = find_service(read_up_state(up.state_file), "attention", "attention-0")["restarts"]
    assert generate_concurrently(up, MAX_TOKENS, "ak", while_running=kill, timeout_s=240) == want
    assert find_service(read_up_state(up.state_file), "attention", "attention-0")["restarts"] == restarts + 1
    up.wait_requests_ended([f"ak-{i}" for i in range(len(PROMPTS))])


@pytest.mark.parametrize("fault_signal", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_replica_stopped_beside_another_loses_no_request(model_dir, want, fault_signal):
    """With two replicas, SIGTERM of one mid-generation: it hands its requests off (their routers resume
    them on the other with the tokens so far) instead of finishing them. SIGKILL: the routers resume them
    on the other (or the restarted one). Either way every stream gets the single-process tokens once."""
    up = UpCluster(model_dir, attention=2, shards=2, redundant=0)
    try:
        store = RequestStore(up.redis, up.registry.keys)
        records = lambda: [store.get(f"tm-{i}") for i in range(len(PROMPTS))]   # noqa: E731

        def stop_attention_0():
            assert "attention-0" in {r.owner for r in records()}
            os.kill(up.service_pid("attention", "attention-0"), fault_signal)
            if fault_signal == signal.SIGTERM:
                wait_until(lambda: all(r.owner != "attention-0" or r.state == "finished" for r in records()), 60,
                           "every open request handed to attention-1",
                           state=lambda: [(r.owner, r.state) for r in records()])

        assert generate_concurrently(up, MAX_TOKENS, "tm", while_running=stop_attention_0, timeout_s=240) == want
        up.wait_requests_ended([f"tm-{i}" for i in range(len(PROMPTS))])
    finally:
        up.stop()


def test_a_redis_restart_mid_generation_loses_no_request(up, want):
    """Redis is SIGKILLed while 16 greedy streams run; `epserve up` restarts it from its append-only file.
    Tokens keep flowing (the token log is written asynchronously and catches up), every stream gets the
    single-process tokens, and every record ends finished with its whole token log."""
    store = RequestStore(up.redis, up.registry.keys)

    def kill_redis():
        time.sleep(1.2)                                  # the records are in the append-only file (fsync 1 s)
        os.kill(find_service(read_up_state(up.state_file), "redis", "0")["pid"], signal.SIGKILL)

    got = generate_concurrently(up, MAX_TOKENS, "rd", while_running=kill_redis, timeout_s=240)
    assert got == want
    assert find_service(read_up_state(up.state_file), "redis", "0")["restarts"] == 1
    up.wait_requests_ended([f"rd-{i}" for i in range(len(PROMPTS))])
    wait_until(lambda: all(store.tokens(f"rd-{i}") == want[i] for i in range(len(PROMPTS))), 30,
               "every token log complete")


def test_a_10_s_redis_outage_delays_no_token(up, want):
    """Redis stops answering (SIGSTOP: connections hang, nothing is refused) while 16 greedy streams run, for
    10 s and until every stream has ended: the token path needs no Redis. A token that waited on Redis would
    arrive at least a socket timeout (5 s) after the one before it; every gap stays below that, and every
    stream ends within 15 s (a record update waited on would take 4 tries of 5 s). Then Redis resumes, and
    the records and token logs catch up, and every service, whose registry entry expired meanwhile (3 s TTL),
    is registered again."""
    store = RequestStore(up.redis, up.registry.keys)
    ids = [f"fz-{i}" for i in range(len(PROMPTS))]
    redis_pid = find_service(read_up_state(up.state_file), "redis", "0")["pid"]
    frozen_at = None

    def stream(i: int) -> tuple[list[int], list[float]]:
        with Client(up.endpoint, timeout=15) as client:
            chunks = client.stream(PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True,
                                   request_id=ids[i])
            tokens, arrivals = [], []
            for chunk in chunks:
                tokens += chunk.token_ids
                arrivals.append(time.monotonic())
            return tokens, arrivals

    try:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            futures = [pool.submit(stream, i) for i in range(len(PROMPTS))]
            wait_until(lambda: all(r is not None and r.emitted > 0 for r in map(store.get, ids)), 60,
                       "every stream under way")
            os.kill(redis_pid, signal.SIGSTOP)
            frozen_at = time.monotonic()
            results = [f.result(timeout=60) for f in futures]
        time.sleep(max(0.0, 10 - (time.monotonic() - frozen_at)))
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    assert [tokens for tokens, _ in results] == want
    gaps = [b - a for _, arrivals in results for a, b in zip(arrivals, arrivals[1:]) if b > frozen_at]
    assert gaps and max(gaps) < 5.0, max(gaps)
    up.wait_requests_ended(ids, timeout_s=120)
    wait_until(lambda: all(store.tokens(i) == w for i, w in zip(ids, want)), 60, "every token log complete")
    live = lambda: {kind: len(up.registry.live(kind)) for kind in ("router", "attention", "expert")}   # noqa: E731
    wait_until(lambda: live() == {"router": 1, "attention": 1, "expert": 2}, 30, "every service registered again",
               state=live)
