"""Whole clusters started by `epserve up`: separate processes, real Redis, real gRPC.

The cluster must give exactly the single-process engine's tokens, validate at the edge, free KV on
cancellation, serve replicated experts from both copies, and leave nothing behind on SIGTERM.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import redis
import torch
from epserve_client import Client, InvalidArgument

from epserve.services.cluster import cluster_tls, nixl_transport
from epserve.services.cluster.cluster_tls import ClusterTls
from epserve.services.cluster.keys import Keys
from epserve.services.cluster.ports import free_ports
from epserve.services.cluster.registry import Registry
from epserve.services.cluster.requests import RequestStore
from epserve.services.cluster.state import PlacementStore
from epserve.services.cluster.tensor_codec import from_proto
from epserve.services.engine.engine import EngineConfig, LLMEngine
from epserve.services.engine.params import SamplingParams
from epserve.services.proto import attention_pb2, attention_pb2_grpc, expert_pb2, expert_pb2_grpc
from epserve.services.up_state import find_service, read_up_state, wait_ready
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

PROMPTS = [[(7 * i + 3 * j) % 250 + 2 for j in range(3 + (5 * i) % 23)] for i in range(16)]
MAX_TOKENS = 10


class UpCluster:
    """`epserve up` in a subprocess, with what a test needs to look inside."""

    def __init__(self, model_dir, attention: int, shards: int, redundant: int, micro_batch_min_tokens: int = 1,
                 transport: str = "auto", flags: tuple[str, ...] = ()):
        self.port, http_port = free_ports(2)
        self.state_file = os.path.join(tempfile.mkdtemp(prefix="epserve-up-"), "state.json")
        command = [sys.executable, "-m", "epserve.services.cli", "up", "--model", str(model_dir), "--dtype", "float32",
                   "--attention", str(attention), "--expert-shards", str(shards),
                   "--redundant-experts", str(redundant), "--port", str(self.port),
                   "--micro-batch-min-tokens", str(micro_batch_min_tokens), "--transport", transport,
                   "--state-file", self.state_file, "--http-port", str(http_port), *flags]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        state = wait_ready(self.state_file, self.process, timeout_s=240)
        self.redis = redis.Redis.from_url(state["redis_url"])
        self.registry = Registry(self.redis, Keys(state["cluster"]))
        self.endpoint = state["endpoint"]
        self.admin_tls = ClusterTls.from_files(**state["admin_tls"])     # may call replicas and shards

    def service_pid(self, kind: str, service_id: str) -> int:
        return find_service(read_up_state(self.state_file), kind, service_id)["pid"]

    def children(self) -> list[int]:
        with open(f"/proc/{self.process.pid}/task/{self.process.pid}/children") as f:
            return [int(pid) for pid in f.read().split()]

    def internal_channel(self, service) -> grpc.Channel:
        """A mutual-TLS channel to an attention replica or expert shard, as the cluster's admin."""
        return cluster_tls.channel(service.address, self.admin_tls, service.kind, [])

    def replica_load(self, service) -> attention_pb2.LoadReport:
        with self.internal_channel(service) as channel:
            return attention_pb2_grpc.AttentionServiceStub(channel).GetLoad(attention_pb2.LoadRequest(), timeout=10)

    def shard_info(self, service) -> expert_pb2.ShardInfo:
        with self.internal_channel(service) as channel:
            return expert_pb2_grpc.ExpertServiceStub(channel).GetShardInfo(expert_pb2.ShardInfoRequest(), timeout=10)

    def wait_requests_ended(self, request_ids: list[str], timeout_s: float = 30) -> None:
        """Every record ends finished, with a TTL, and every live replica frees every KV block (records are
        written off the token path, so they may trail the streams)."""
        store = RequestStore(self.redis, self.registry.keys)
        records = lambda: [store.get(i) for i in request_ids]   # noqa: E731
        wait_until(lambda: all(r is not None and r.state == "finished" for r in records()), timeout_s,
                   "every record finished", state=lambda: [r and r.state for r in records()])
        assert all(self.redis.ttl(self.registry.keys.request(i)) > 0 for i in request_ids)
        wait_until(lambda: all(self.replica_load(r).kv_blocks_used == 0 for r in self.registry.live("attention")),
                   timeout_s, "every KV block free")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def model_dir(hf_checkpoints):
    return hf_checkpoints["groups_yarn"]


@pytest.fixture(scope="module")
def expected(model_dir):
    engine = LLMEngine.from_path(model_dir, EngineConfig(block_size=16, num_kv_blocks=256), dtype=torch.float32)
    seqs = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    return [s.output_ids for s in seqs]


@pytest.fixture(scope="module")
def cluster(model_dir):
    up = UpCluster(model_dir, attention=1, shards=2, redundant=2, flags=("--capacity", "1,0.5"))
    yield up
    if up.process.poll() is None:
        up.stop()


def generate_all(endpoint: str) -> list[list[int]]:
    with Client(endpoint, timeout=300) as client, ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = pool.map(lambda p: client.generate(p, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True), PROMPTS)
        return [r.token_ids for r in results]


def generate_concurrently(up: "UpCluster", max_tokens: int, tag: str, while_running=None,
                          timeout_s: float = 180) -> list[list[int]]:
    """The 16 prompts at once (greedy, request ids ``{tag}-{i}``); ``while_running()`` is called once every
    generation has streamed a token, and must leave some still running. Each stream's chunks hold every token
    of its result once, in order."""
    def stream(client: Client, i: int) -> list[int]:
        chunks = client.stream(PROMPTS[i], max_tokens=max_tokens, temperature=0, ignore_eos=True,
                               request_id=f"{tag}-{i}")
        received = [token for chunk in chunks for token in chunk.token_ids]
        assert received == chunks.result.token_ids, f"{tag}-{i}: the stream's chunks differ from its result"
        return received

    with Client(up.endpoint, timeout=timeout_s) as client, ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(stream, client, i) for i in range(len(PROMPTS))]
        if while_running is not None:
            store = RequestStore(up.redis, up.registry.keys)
            records = lambda: [store.get(f"{tag}-{i}") for i in range(len(PROMPTS))]   # noqa: E731
            wait_until(lambda: all(r is not None and r.emitted > 0 for r in records()), 60,
                       "every generation under way", state=lambda: [r and r.emitted for r in records()])
            while_running()
            assert not all(f.done() for f in futures)                  # it happened mid-generation
        return [f.result(timeout=240) for f in futures]


def test_one_replica_two_shards_two_redundant_matches_single_process(cluster, expected):
    assert generate_all(cluster.endpoint) == expected
    assert [r.info["expert_transport"] for r in cluster.registry.live("attention")] == ["local"]   # auto, one host
    assert [s.info["capacity"] for s in cluster.registry.live("expert")] == [1.0, 0.5]          # --capacity 1,0.5


@pytest.mark.skipif(not nixl_transport.available(), reason="NIXL (nixl-cu12) is not installed")
def test_nixl_cluster_matches_single_process(model_dir, expected):
    up = UpCluster(model_dir, attention=1, shards=2, redundant=1, transport="nixl")
    try:
        assert generate_all(up.endpoint) == expected
        assert [r.info["expert_transport"] for r in up.registry.live("attention")] == ["nixl"]
    finally:
        up.stop()


@pytest.mark.gpu
def test_a_gpu_cluster_over_cuda_ipc_matches_single_process(model_dir, expected):
    """Replica and shards on the GPU: the local transport shares GPU slots by CUDA IPC (float32, so that the
    shards' partial sums add up as the single process's do on the CPU)."""
    up = UpCluster(model_dir, attention=1, shards=2, redundant=2, flags=("--device", "cuda"))
    try:
        assert generate_all(up.endpoint) == expected
        assert [r.info["expert_transport"] for r in up.registry.live("attention")] == ["local-cuda"]   # not the fallback
    finally:
        up.stop()


def test_two_replicas_three_shards_match_single_process(model_dir, expected):
    up = UpCluster(model_dir, attention=2, shards=3, redundant=0, micro_batch_min_tokens=128,  # the default
                   transport="grpc")
    try:
        assert generate_all(up.endpoint) == expected
        assert [r.info["expert_transport"] for r in up.registry.live("attention")] == ["grpc", "grpc"]
        assert all(up.replica_load(r).kv_blocks_used == 0 for r in up.registry.live("attention"))
    finally:
        up.stop()


def test_replicated_experts_are_served_by_both_copies(cluster, expected):
    generate_all(cluster.endpoint)
    shards = cluster.registry.live("expert")
    counts = {int(s.service_id): from_proto(cluster.shard_info(s).tokens_per_slot) for s in shards}  # [rows, slots]
    placement = PlacementStore(cluster.redis, cluster.registry.keys).current()
    replicated = (placement.replica_counts >= 2).nonzero().tolist()
    assert replicated, "the placement has no replicated expert"
    served_by_both = 0
    for row, expert in replicated:
        copies = placement.logical_to_physical[row, expert, :2].tolist()
        per_copy = [int(counts[placement.shard_of_slot(s)][row, s % placement.slots_per_shard]) for s in copies]
        served_by_both += all(c > 0 for c in per_copy)
    assert served_by_both >= 1


BAD_INPUTS = [
    (dict(prompt=""), "text"),
    (dict(prompt=[1] * 600), "token_ids"),
    (dict(prompt=[5, 6], max_tokens=0), "sampling.max_tokens"),
    (dict(prompt=[5, 6], max_tokens=100_000), "sampling.max_tokens"),
    (dict(prompt=[5, 6], temperature=-0.5), "sampling.temperature"),
    (dict(prompt=[5, 6], top_p=0.0), "sampling.top_p"),
    (dict(prompt=[5, 6], top_p=1.5), "sampling.top_p"),
    (dict(prompt=[5, 6], top_k=-1), "sampling.top_k"),
    (dict(prompt=[5, 99_999]), "token_ids"),
    (dict(prompt="x" * (5 << 20)), "text"),
]


@pytest.mark.parametrize("kwargs,field", BAD_INPUTS, ids=[f for _, f in BAD_INPUTS])
def test_bad_input_is_invalid_argument_naming_the_field_and_cluster_keeps_serving(cluster, expected, kwargs, field):
    kwargs = {"max_tokens": 4, **kwargs}
    with Client(cluster.endpoint, timeout=60) as client:
        prompt = kwargs.pop("prompt")
        with pytest.raises(InvalidArgument) as err:
            client.generate(prompt, **kwargs)
        assert err.value.message.startswith(field), err.value.message
        assert client.generate(PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True).token_ids == expected[0]


def test_cancelled_stream_frees_its_kv_blocks(cluster):
    replica = cluster.registry.live("attention")[0]
    with Client(cluster.endpoint, timeout=120) as client:
        stream = client.stream(PROMPTS[3], max_tokens=400, temperature=0, ignore_eos=True)
        next(stream), next(stream)
        assert cluster.replica_load(replica).kv_blocks_used > 0
        stream.cancel()
        request_id = stream.request_id
    wait_until(lambda: cluster.replica_load(replica).kv_blocks_used == 0, 30, "the KV blocks to be freed",
               state=lambda: cluster.replica_load(replica).kv_blocks_used)
    store = RequestStore(cluster.redis, cluster.registry.keys)
    wait_until(lambda: store.get(request_id).state == "aborted", 30, "the record to say aborted")
    assert len(store.tokens(request_id)) < 400          # freed by the abort, not by finishing


def test_sigterm_leaves_no_child_process(model_dir):
    up = UpCluster(model_dir, attention=1, shards=2, redundant=0)
    children = up.children()
    state = read_up_state(up.state_file)
    assert sorted(children) == sorted(s["pid"] for s in state["services"])    # redis, 2 shards, attention, router
    assert [(s["kind"], s["id"]) for s in state["services"]] == [
        ("redis", "0"), ("expert", "0"), ("expert", "1"), ("attention", "attention-0"), ("router", "router-0")]
    assert all(s["address"] for s in state["services"]) and state["endpoint"] == up.endpoint
    assert up.stop() == 0
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not os.path.exists(up.state_file)


def test_cli_generate_through_the_endpoint(cluster, expected):
    base = [sys.executable, "-m", "epserve.services.cli", "generate", "--endpoint", cluster.endpoint,
            "--prompt-ids", ",".join(map(str, PROMPTS[5])), "--max-tokens", str(MAX_TOKENS)]
    out = subprocess.run(base + ["--temperature", "0", "--ignore-eos", "--json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["token_ids"] == expected[5] and result["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == MAX_TOKENS and result["kv_cache_bytes_per_token"] > 0
    refused = subprocess.run(base + ["--top-p", "2"], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "sampling.top_p" in refused.stderr and "Traceback" not in refused.stderr


def test_deadline_aborts_the_request_and_frees_its_kv(cluster):
    from epserve_client import DeadlineExceeded

    replica = cluster.registry.live("attention")[0]
    with Client(cluster.endpoint, timeout=1.0) as client:
        with pytest.raises(DeadlineExceeded):
            client.generate(PROMPTS[2], max_tokens=450, temperature=0, ignore_eos=True, request_id="deadline-1")
    wait_until(lambda: cluster.replica_load(replica).kv_blocks_used == 0, 30, "the KV blocks to be freed",
               state=lambda: cluster.replica_load(replica).kv_blocks_used)
    store = RequestStore(cluster.redis, cluster.registry.keys)
    wait_until(lambda: store.get("deadline-1").state != "running", 30,      # the router records the end
               "the request's record to end", state=lambda: store.get("deadline-1"))  # after the client saw it
    assert store.get("deadline-1").state in ("aborted", "failed")
    assert len(store.tokens("deadline-1")) < 450        # freed by the abort, not by finishing


def test_killed_expert_shard_is_restarted_and_the_cluster_serves_again(model_dir, expected):
    up = UpCluster(model_dir, attention=1, shards=2, redundant=0)
    try:
        pid = up.service_pid("expert", "1")
        os.kill(pid, signal.SIGKILL)
        served = _served_again(up, "the restarted shard")
        assert served.token_ids == expected[0]
        assert pid not in up.children() and up.process.poll() is None
        def restarted_shard():                                                   # the state file follows it,
            shard = find_service(read_up_state(up.state_file), "expert", "1")   # once up's monitor has looked
            return shard if shard["address"] else None

        shard = wait_until(restarted_shard, 30, "the restarted shard's address in the state file")
        assert shard["restarts"] == 1 and shard["pid"] in up.children()
    finally:
        up.stop()


def test_sigkill_of_an_expert_shard_mid_generation_loses_no_request(model_dir):
    """16 concurrent greedy generations; shard 1 is killed while they run. The replica's failed steps run
    again once `epserve up` has restarted the shard: every request completes with the single-process tokens."""
    prompts, max_tokens = PROMPTS[:16], 160
    engine = LLMEngine.from_path(model_dir, EngineConfig(block_size=16, num_kv_blocks=512, micro_batches=1),
                                 dtype=torch.float32)
    want = [s.output_ids for s in engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                          ignore_eos=True))]
    up = UpCluster(model_dir, attention=1, shards=2, redundant=0)
    try:
        with Client(up.endpoint, timeout=120) as client, ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(lambda i=i, p=p: client.generate(
                p, max_tokens=max_tokens, temperature=0, ignore_eos=True, request_id=f"kill-{i}").token_ids)
                for i, p in enumerate(prompts)]
            store = RequestStore(up.redis, up.registry.keys)
            records = lambda: [store.get(f"kill-{i}") for i in range(len(prompts))]   # noqa: E731
            wait_until(lambda: all(r is not None and r.emitted > 0 for r in records()), 60, "every generation under way",
                       state=lambda: [r and r.emitted for r in records()])
            os.kill(up.service_pid("expert", "1"), signal.SIGKILL)
            assert not all(f.done() for f in futures)                  # killed mid-generation
            got = [f.result(timeout=180) for f in futures]
        assert got == want
        assert find_service(read_up_state(up.state_file), "expert", "1")["restarts"] == 1
    finally:
        up.stop()


def test_a_killed_attention_replica_s_request_resumes_with_the_same_tokens(model_dir):
    """The router's session to the replica breaks mid-stream; it resubmits the request, with the tokens
    already streamed, once `epserve up` has restarted the replica: the client's one stream gets every
    token once, exactly the single-process engine's."""
    max_tokens = 300
    engine = LLMEngine.from_path(model_dir, EngineConfig(block_size=16, num_kv_blocks=256, micro_batches=1),
                                 dtype=torch.float32)
    (want,) = [s.output_ids for s in engine.generate([PROMPTS[0]], SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                                   ignore_eos=True))]
    up = UpCluster(model_dir, attention=1, shards=2, redundant=0)
    try:
        with Client(up.endpoint, timeout=120) as client:
            stream = client.stream(PROMPTS[0], max_tokens=max_tokens, temperature=0, ignore_eos=True)
            chunks = iter(stream)
            got = list(next(chunks).token_ids)                   # running on the replica
            os.kill(up.service_pid("attention", "attention-0"), signal.SIGKILL)
            for chunk in chunks:
                got += chunk.token_ids
        assert got == want and stream.result.token_ids == want
        assert find_service(read_up_state(up.state_file), "attention", "attention-0")["restarts"] == 1
        up.wait_requests_ended([stream.request_id])
    finally:
        up.stop()


def _served_again(up: UpCluster, what: str):
    """The first generation that succeeds after a kill (failures until the service is back), within 120 s."""
    from epserve_client import EpserveError

    errors = []

    def attempt():
        try:
            with Client(up.endpoint, timeout=30) as client:
                return client.generate(PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        except EpserveError as err:
            errors.append(err)
            time.sleep(0.5)
            return None

    return wait_until(attempt, 120, f"a generation served by {what}", state=lambda: errors[-1:])
