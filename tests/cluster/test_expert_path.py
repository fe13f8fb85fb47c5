"""The expert data path: real ExpertShard gRPC servers on loopback, the gRPC transport, RemoteExperts."""
import contextlib
import threading
from dataclasses import dataclass

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epserve.services.attention.remote_experts import RemoteExperts
from epserve.services.cluster.grpc_server import GrpcServer, start_grpc_server
from epserve.services.cluster.placement import EMPTY, Placement, build_placement
from epserve.services.cluster.tensor_codec import from_proto, to_proto
from epserve.services.cluster.expert_batch import from_request
from epserve.services.cluster.transport import ExpertShardError, ExpertTransport, ShardEndpoint
from epserve.services.engine.engine import EngineConfig, LLMEngine
from epserve.services.expert.shard import ExpertShard
from epserve.services.model.checkpoint import CheckpointReader
from epserve.services.model.config import ModelConfig
from tests.cluster.conftest import MODEL
from epserve.services.model.moe import LocalExperts
from epserve.services.proto import expert_pb2, expert_pb2_grpc, tensor_pb2
from tests.hf_models import PARITY_PROMPTS, greedy_with_logits

pytestmark = pytest.mark.integration

SERVICE = "epserve.v1.ExpertService"
NEW_TOKENS = 12
PROMPTS = PARITY_PROMPTS
ENGINE_CONFIG = EngineConfig(block_size=4, num_kv_blocks=64)
WAIT_S = 60                                # a bound against hangs, never asserted on


@dataclass
class Cluster:
    shards: list[ExpertShard]
    servers: list[GrpcServer]

    @property
    def addresses(self) -> dict[int, str]:
        return {i: server.address for i, server in enumerate(self.servers)}

    def info(self, shard: int) -> expert_pb2.ShardInfo:
        with grpc.insecure_channel(self.servers[shard].address) as channel:
            return expert_pb2_grpc.ExpertServiceStub(channel).GetShardInfo(
                expert_pb2.ShardInfoRequest(request_id="info"), timeout=WAIT_S)


@contextlib.contextmanager
def shard_cluster(path, placement: Placement, *, dtype=torch.float32, max_workers=64, **shard_kwargs):
    """One ExpertShard gRPC server per shard of ``placement``; all stopped and closed on exit."""
    shards, servers = [], []
    try:
        for shard_id in range(placement.num_shards):
            shard = ExpertShard(path, shard_id, placement, dtype=dtype, **shard_kwargs)
            shards.append(shard)
            servers.append(start_grpc_server(
                lambda server, s=shard: expert_pb2_grpc.add_ExpertServiceServicer_to_server(s, server),
                [SERVICE], max_workers=max_workers))
        yield Cluster(shards, servers)
    finally:
        for server in servers:
            server.stop(None)
        for shard in shards:
            shard.close()


@contextlib.contextmanager
def grpc_transport(addresses: dict[int, str]):
    transport = ExpertTransport({shard: ShardEndpoint(address) for shard, address in addresses.items()}, mode="grpc")
    try:
        yield transport
    finally:
        transport.close()


@pytest.fixture(scope="module")
def in_process(path):
    """The single-process engine's greedy tokens and logits (every routed expert local)."""
    return greedy_with_logits(LLMEngine.from_path(path, ENGINE_CONFIG, dtype=torch.float32), PROMPTS, NEW_TOKENS)


def remote_generation(path, placement: Placement, wire_dtype: str = "model", sync_free: bool = False):
    """(greedy result through shards, the cluster's per-shard ShardInfo after the run, dispatch stats)."""
    with shard_cluster(path, placement) as cluster, grpc_transport(cluster.addresses) as transport:
        backend = RemoteExperts(placement, transport, wire_dtype=wire_dtype, sync_free=sync_free)
        engine = LLMEngine.from_path(path, ENGINE_CONFIG, dtype=torch.float32, backend=backend)
        result = greedy_with_logits(engine, PROMPTS, NEW_TOKENS)
        return result, [cluster.info(s) for s in range(placement.num_shards)], backend.stats


# ---- generation through the shards ------------------------------------------------------------
@pytest.mark.parametrize("num_shards", [2, 3])
def test_greedy_generation_through_shards_matches_in_process(path, config, in_process, num_shards):
    placement = build_placement(config.n_routed_experts, num_shards, 2, config.moe_layers)
    if num_shards == 3:
        assert (placement.physical_to_logical == EMPTY).any(), "S=3 should leave empty slots"
    remote, infos, _ = remote_generation(path, placement)
    for (tokens, logits), (ref_tokens, ref_logits) in zip(remote, in_process):
        assert tokens == ref_tokens
        assert (logits - ref_logits).abs().max().item() <= 1e-4
    # every (token, choice) of every MoE layer was served exactly once, somewhere
    tokens_run = sum(len(p) + NEW_TOKENS - 1 for p in PROMPTS)
    served = sum(from_proto(info.tokens_per_slot) for info in infos)           # [rows, slots]
    assert served.sum(dim=1).tolist() == [tokens_run * config.num_experts_per_tok] * len(config.moe_layers)
    assert all(from_proto(info.tokens_per_slot).sum() > 0 for info in infos)
    assert [info.placement_version for info in infos] == [placement.version] * num_shards


def test_sync_free_dispatch_sends_every_row_to_every_shard_with_the_same_result(path, config, in_process):
    """The dispatch a GPU replica makes (nothing about routing read on the host), run on the CPU: the same
    tokens and the same choices served per slot as the sparse dispatch, every row going to every shard."""
    placement = build_placement(config.n_routed_experts, 3, 2, config.moe_layers)
    sparse, sparse_infos, sparse_stats = remote_generation(path, placement)
    dense, dense_infos, dense_stats = remote_generation(path, placement, sync_free=True)
    for (tokens, logits), (ref_tokens, ref_logits) in zip(dense, in_process):
        assert tokens == ref_tokens
        assert (logits - ref_logits).abs().max().item() <= 1e-4
    assert all(torch.equal(from_proto(a.tokens_per_slot), from_proto(b.tokens_per_slot))
               for a, b in zip(sparse_infos, dense_infos))
    assert dense_stats.token_shards == 3 * dense_stats.tokens > sparse_stats.token_shards


def test_fp8_wire_stays_close(path, config, in_process):
    placement = build_placement(config.n_routed_experts, 2, 2, config.moe_layers)
    remote, _, _ = remote_generation(path, placement, wire_dtype="fp8")
    for (tokens, logits), (ref_tokens, ref_logits) in zip(remote, in_process):
        assert tokens[:4] == ref_tokens[:4]
        first = logits[0] - ref_logits[0]
        assert first.abs().max().item() <= 5e-2 * ref_logits[0].abs().max().item()


# ---- one MoE layer, straight through RemoteExperts ----------------------------------------------
def _tokens_choosing(expert: int, tokens: int, experts: int, k: int, seed: int = 0) -> torch.Tensor:
    """topk_ids [tokens, k]: distinct random experts per token, ``expert`` always among them."""
    g = torch.Generator().manual_seed(seed)
    others = torch.stack([torch.randperm(experts - 1, generator=g)[:k - 1] for _ in range(tokens)])
    others = others + (others >= expert).long()                               # skip ``expert``
    return torch.cat([torch.full((tokens, 1), expert), others], dim=1)


@pytest.mark.parametrize("wire_dtype", ["model", "fp8"])
def test_both_copies_of_a_hot_expert_serve_tokens(path, config, wire_dtype):
    hot, tokens, k = 5, 64, config.num_experts_per_tok
    load = torch.ones(len(config.moe_layers), config.n_routed_experts)
    load[:, hot] = 100.0
    placement = build_placement(config.n_routed_experts, 2, 1, config.moe_layers, load)
    copies = placement.logical_to_physical[0, hot].tolist()                     # [slot on shard 0, on shard 1]
    assert sorted(placement.shard_of_slot(s) for s in copies) == [0, 1]
    layer = config.moe_layers[0]
    local = LocalExperts.load(CheckpointReader(path), config, [layer], dtype=torch.float32, device="cpu")
    x = torch.randn(tokens, config.hidden_size, generator=torch.Generator().manual_seed(1))
    ids = _tokens_choosing(hot, tokens, config.n_routed_experts, k)
    weights = torch.rand(tokens, k, generator=torch.Generator().manual_seed(2))
    flushed = []
    with shard_cluster(path, placement, on_flush=lambda _, delta: flushed.append(delta), flush_interval_s=0.01) as cluster:
        with grpc_transport(cluster.addresses) as transport:
            remote = RemoteExperts(placement, transport, wire_dtype=wire_dtype)
            out = remote.combine(remote.dispatch(layer, x, weights, ids))
        counts = [from_proto(cluster.info(s).tokens_per_slot) for s in range(2)]    # [rows, slots] each
    expected = local.combine(local.dispatch(layer, x, weights, ids))
    tolerance = 1e-5 if wire_dtype == "model" else 1e-1       # e4m3 keeps 3 mantissa bits
    assert (out - expected).abs().max().item() <= tolerance * expected.abs().max().item()
    per_copy = [int(counts[placement.shard_of_slot(s)][0, s % placement.slots_per_shard]) for s in copies]
    assert min(per_copy) > 0 and sum(per_copy) == tokens, per_copy
    assert sum(d.sum() for d in flushed).item() == sum(c.sum() for c in counts).item() == tokens * k


# ---- health, bad requests, broken streams ----------------------------------------------------------
@pytest.fixture(scope="module")
def uneven(path, config):
    """Three shards over 34 copies: 36 slots, so some shard has an empty slot."""
    placement = build_placement(config.n_routed_experts, 3, 2, config.moe_layers)
    with shard_cluster(path, placement) as cluster:
        yield placement, cluster


def test_health_and_reflection(uneven):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    _, cluster = uneven
    with grpc.insecure_channel(cluster.servers[0].address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=WAIT_S)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                               timeout=WAIT_S))
        assert SERVICE in {s.name for s in reply.list_services_response.service}


def _request(placement: Placement, config: ModelConfig, **changes) -> expert_pb2.DispatchRequest:
    """A valid request for shard 0: two tokens, local slots 0 and 1 (filled on every shard)."""
    fields = dict(request_id="r", layer=config.moe_layers[0], placement_version=placement.version,
                  hidden=to_proto(torch.randn(2, config.hidden_size)),
                  topk_slots=to_proto(torch.tensor([[0, -1], [1, 0]], dtype=torch.int32)),
                  topk_weights=to_proto(torch.ones(2, 2)))
    fields.update(changes)
    return expert_pb2.DispatchRequest(**{k: v for k, v in fields.items() if v is not None})


def _batch(placement: Placement, config: ModelConfig, **changes):
    """The ExpertBatch of ``_request``."""
    return from_request(_request(placement, config, **changes))


def _empty_slot(placement: Placement) -> tuple[int, int, int]:
    """(layer, shard, local slot) of some EMPTY slot."""
    row, slot = (placement.physical_to_logical == EMPTY).nonzero()[0].tolist()
    return placement.moe_layers[row], placement.shard_of_slot(slot), slot % placement.slots_per_shard


BAD_REQUESTS = {   # name -> (changes, code, field named)
    "dense layer": (dict(layer=0), grpc.StatusCode.INVALID_ARGUMENT, "layer"),
    "wrong hidden size": (dict(hidden=to_proto(torch.zeros(2, 65))), grpc.StatusCode.INVALID_ARGUMENT, "hidden"),
    "wrong hidden dtype": (dict(hidden=to_proto(torch.zeros(2, 64, dtype=torch.float16))),
                           grpc.StatusCode.INVALID_ARGUMENT, "hidden"),
    "no hidden": (dict(hidden=None), grpc.StatusCode.INVALID_ARGUMENT, "hidden"),
    "fp8 without scales": (dict(hidden=to_proto(torch.zeros(2, 64).to(torch.float8_e4m3fn))),
                           grpc.StatusCode.INVALID_ARGUMENT, "scales"),
    "slot out of range": (dict(topk_slots=to_proto(torch.tensor([[0, 1000], [1, 0]], dtype=torch.int32))),
                          grpc.StatusCode.INVALID_ARGUMENT, "topk_slots"),
    "int64 slots": (dict(topk_slots=to_proto(torch.zeros(2, 2, dtype=torch.int64))),
                    grpc.StatusCode.INVALID_ARGUMENT, "topk_slots"),
    "weights shape": (dict(topk_weights=to_proto(torch.ones(2, 3))), grpc.StatusCode.INVALID_ARGUMENT,
                      "topk_weights"),
    "bytes short of the shape": (dict(topk_weights=tensor_pb2.Tensor(data=b"1234", dtype="float32", shape=[2, 2])),
                                 grpc.StatusCode.INVALID_ARGUMENT, "topk_weights"),
    "other placement": (dict(placement_version=99), grpc.StatusCode.FAILED_PRECONDITION, "placement_version"),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_request_ends_its_stream_and_the_shard_keeps_serving(uneven, config, name):
    placement, cluster = uneven
    changes, code, field = BAD_REQUESTS[name]
    good, bad = _request(placement, config), _request(placement, config, **changes)
    with grpc.insecure_channel(cluster.servers[0].address) as channel:
        stub = expert_pb2_grpc.ExpertServiceStub(channel)
        responses = stub.Dispatch(iter([good, bad, good]), timeout=WAIT_S)
        assert from_proto(next(responses).output).shape == (2, config.hidden_size)
        with pytest.raises(grpc.RpcError) as error:
            next(responses)
        assert error.value.code() == code
        assert error.value.details().startswith(f"expert shard 0: {field}:"), error.value.details()
        again = list(stub.Dispatch(iter([good, good]), timeout=WAIT_S))      # a new stream is served
        assert [r.request_id for r in again] == ["r", "r"]


def test_request_for_an_empty_slot_is_refused(uneven, config):
    placement, cluster = uneven
    layer, shard, slot = _empty_slot(placement)
    bad = _request(placement, config, layer=layer,
                   topk_slots=to_proto(torch.tensor([[slot, -1], [0, -1]], dtype=torch.int32)))
    with grpc.insecure_channel(cluster.servers[shard].address) as channel:
        with pytest.raises(grpc.RpcError) as error:
            list(expert_pb2_grpc.ExpertServiceStub(channel).Dispatch(iter([bad]), timeout=WAIT_S))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "topk_slots: addresses an empty slot" in error.value.details()


def test_transport_fails_the_broken_stream_and_later_sends_fast(uneven, config):
    placement, cluster = uneven
    with grpc_transport(cluster.addresses) as transport:
        ok = transport.send(0, _batch(placement, config)).result(timeout=WAIT_S)
        assert ok.shape == (2, config.hidden_size)
        bad = transport.send(0, _batch(placement, config, layer=0))
        with pytest.raises(ExpertShardError) as error:
            bad.result(timeout=WAIT_S)
        assert error.value.shard == 0 and error.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"expert shard 0 at {cluster.servers[0].address}" in str(error.value) and "layer" in str(error.value)
        later = transport.send(0, _batch(placement, config))
        assert later.done() and isinstance(later.exception(), ExpertShardError)
        assert transport.send(1, _batch(placement, config)).result(timeout=WAIT_S).shape == (2, config.hidden_size)


def test_killing_a_shard_fails_its_pending_futures(path, config):
    """The server's only worker thread is held by another stream, so the transport's requests stay pending."""
    placement = build_placement(config.n_routed_experts, 1, 0, config.moe_layers)
    release = threading.Event()

    def one_request_then_wait():
        yield _request(placement, config)
        release.wait()

    with shard_cluster(path, placement, max_workers=1) as cluster:
        server = cluster.servers[0]
        with grpc.insecure_channel(server.address) as channel:
            hold = expert_pb2_grpc.ExpertServiceStub(channel).Dispatch(one_request_then_wait())
            next(hold)                                      # its handler now holds the worker, waiting
            with grpc_transport(cluster.addresses) as transport:
                pending = [transport.send(0, _batch(placement, config)) for _ in range(4)]
                assert not any(f.done() for f in pending)
                server.stop(None)
                for future in pending:
                    with pytest.raises(ExpertShardError, match=f"expert shard 0 at {server.address}"):
                        future.result(timeout=WAIT_S)
                later = transport.send(0, _batch(placement, config))
                assert later.done() and isinstance(later.exception(), ExpertShardError)
            release.set()


def test_many_requests_in_flight_from_many_threads(uneven, config):
    """Concurrent senders on one stream: every future gets the response to its own request."""
    placement, cluster = uneven
    requests = [_batch(placement, config) for _ in range(48)]               # each its own random hidden
    expected = [cluster.shards[1].serve(r) for r in requests]
    with grpc_transport(cluster.addresses) as transport:
        futures: dict[int, object] = {}

        def sender(start: int) -> None:
            for i in range(start, len(requests), 4):
                futures[i] = transport.send(1, requests[i])

        threads = [threading.Thread(target=sender, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, want in enumerate(expected):
            assert torch.equal(futures[i].result(timeout=WAIT_S), want)
        assert transport.stats.messages[1] == len(requests)


def test_fp8_checkpoint_shards_keep_fp8_and_read_only_their_experts(hf_checkpoints, tmp_path):
    from epserve.services.model.checkpoint import write_fp8_checkpoint

    fp8 = tmp_path / "fp8"
    write_fp8_checkpoint(hf_checkpoints[MODEL], fp8, num_shards=3)
    config = ModelConfig.from_hf(fp8)
    placement = build_placement(config.n_routed_experts, 2, 2, config.moe_layers)
    reference = greedy_with_logits(LLMEngine.from_path(fp8, ENGINE_CONFIG, dtype=torch.float32), PROMPTS, NEW_TOKENS)
    with shard_cluster(fp8, placement) as cluster:
        for shard in cluster.shards:
            assert all(w.w_gate.dtype == torch.float8_e4m3fn and w.w_down_scale is not None
                       for w in shard.expert_weights(placement.version).values())
            for name in shard.reader.names_read:
                layer, expert = int(name.split(".")[2]), int(name.split(".")[5])
                assert expert in placement.local_experts(layer, shard.shard_id), name
        with grpc_transport(cluster.addresses) as transport:
            engine = LLMEngine.from_path(fp8, ENGINE_CONFIG, dtype=torch.float32,
                                         backend=RemoteExperts(placement, transport))
            remote = greedy_with_logits(engine, PROMPTS, NEW_TOKENS)
    for (tokens, logits), (ref_tokens, ref_logits) in zip(remote, reference):
        assert tokens == ref_tokens
        assert (logits - ref_logits).abs().max().item() <= 1e-4


def test_a_failed_flush_keeps_its_counts_for_the_next(path, config):
    placement = build_placement(config.n_routed_experts, 2, 0, config.moe_layers)
    calls = []

    def on_flush(held, delta):
        assert held is placement
        calls.append(delta.clone())
        if len(calls) == 1:
            raise ConnectionError("redis is down")

    shard = ExpertShard(path, 0, placement, dtype=torch.float32, on_flush=on_flush, flush_interval_s=3600)
    try:
        shard.serve(_batch(placement, config))
        with pytest.raises(ConnectionError):
            shard.flush()
        shard.flush()
        shard.flush()                                                   # nothing new: no call
    finally:
        shard.close()
    assert len(calls) == 2 and torch.equal(calls[1], shard.token_counts()) and calls[1].sum() == 3


def test_a_taken_port_fails_loudly():
    first = start_grpc_server(lambda server: None, [])
    try:
        with pytest.raises(RuntimeError, match="bind"):
            start_grpc_server(lambda server: None, [], address=first.address)
    finally:
        first.stop(None)


def test_the_token_metric_counts_every_version_since_start(path, config):
    """``expert_tokens_total`` is read from the shard's counters at scrape time, and a released placement
    version's tokens stay in it."""
    from epserve.services.metrics import _ExpertCounters

    v1 = build_placement(config.n_routed_experts, 2, 0, config.moe_layers)
    v2 = build_placement(config.n_routed_experts, 2, 2, config.moe_layers, version=2)
    shard = ExpertShard(path, 0, v1, dtype=torch.float32)
    shard.serve(_batch(v1, config))
    shard.hold(v2)
    shard.serve(_batch(v2, config))
    shard.release(1)
    family, dropped = _ExpertCounters(shard.tokens_served, shard.choices_dropped).collect()
    served = {(s.labels["layer"], s.labels["slot"]): s.value for s in family.samples if s.name.endswith("_total")}
    layer = str(config.moe_layers[0])
    assert sum(served.values()) == 6 and {key[0] for key in served} == {layer}
    assert sum(shard.tokens_served().values()) == 6 and shard.token_counts().sum() == 3
    assert [s.value for s in dropped.samples if s.name.endswith("_total")] == [0]
