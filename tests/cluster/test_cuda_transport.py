"""The local transport on a GPU: slots shared by CUDA IPC, and no host round trip on the token path.

Two expert shards run as separately started processes on the GPU (``epserve serve expert --device cuda``
for the conformance test; shard processes made here, with torch's sync-detecting mode on, for the
no-sync test) and this process is the attention side, on the same GPU. Outputs must equal the same
shards served in this process bit for bit: the same kernels on the same inputs.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import Future

import pytest
import torch

from epserve.services.attention.remote_experts import RemoteExperts
from epserve.services.cluster.expert_batch import ExpertBatch
from epserve.services.cluster.local_transport import LocalExpertServer, slot_bytes_for
from epserve.services.cluster.placement import Placement, build_placement
from epserve.services.cluster.state import choose_placement
from epserve.services.cluster.transport import ExpertTransport, ShardEndpoint, host_id
from epserve.services.expert.shard import ExpertShard
from tests.cluster.test_transports import SHARDS, WAIT_S, Shards, every_layer_two_micro_batches

pytestmark = [pytest.mark.gpu, pytest.mark.integration]
DTYPE = torch.bfloat16


class InProcess:
    """An ExpertTransport stand-in that serves each batch with this process's own shards (the reference)."""

    def __init__(self, shards: list[ExpertShard]):
        self.shards = shards

    def send(self, shard: int, batch: ExpertBatch) -> Future:
        future: Future = Future()
        future.set_result(self.shards[shard].serve(batch))
        return future

    def take(self, output: torch.Tensor) -> torch.Tensor:
        return output


def _cuda_batch(batch: ExpertBatch) -> ExpertBatch:
    return ExpertBatch(batch.layer, batch.placement_version, batch.hidden.to("cuda", DTYPE), None,
                       batch.topk_slots.cuda(), batch.topk_weights.cuda())


def test_every_layer_and_micro_batch_over_cuda_ipc_equals_the_in_process_shards(path, config, redis_server):
    shards = Shards(path, redis_server.url, device="cuda", dtype="bfloat16")
    try:
        placement = choose_placement(shards.registry.client, shards.registry.keys, num_experts=config.n_routed_experts,
                                     num_shards=SHARDS, redundant=2, moe_layers=config.moe_layers)
        in_process = [ExpertShard(path, s, placement, dtype=DTYPE, device="cuda") for s in range(SHARDS)]
        transport = ExpertTransport(shards.endpoints(), mode="local", device="cuda",
                                    local_slot_bytes=slot_bytes_for(32, config.hidden_size, config.num_experts_per_tok))
        try:
            assert {transport.kind(s) for s in range(SHARDS)} == {"local-cuda"}
            work = [(shard, _cuda_batch(batch)) for shard, batch in every_layer_two_micro_batches(placement, config)]
            futures = [transport.send(shard, batch) for shard, batch in work]          # all in flight
            for (shard, batch), future in zip(work, futures):
                got = transport.take(future.result(timeout=WAIT_S))              # copied out on the copy stream
                assert got.is_cuda and torch.equal(got, in_process[shard].serve(batch))
        finally:
            transport.close()
    finally:
        shards.stop()


def test_a_killed_shard_s_tokens_go_to_the_other_copies_on_the_gpu(path, config, redis_server):
    """Sync-free dispatch on the GPU, every expert on both shards: a SIGKILLed shard's part is sent again to the
    survivor (the re-send's host-side split gets GPU tensors) and the layer still equals the in-process shards."""
    shards = Shards(path, redis_server.url, device="cuda", dtype="bfloat16", redundant=config.n_routed_experts,
                    controller=False)
    transport = None
    try:
        placement = choose_placement(shards.registry.client, shards.registry.keys, num_experts=config.n_routed_experts,
                                     num_shards=SHARDS, redundant=config.n_routed_experts, moe_layers=config.moe_layers)
        transport = ExpertTransport(shards.endpoints(), mode="local", device="cuda",
                                    local_slot_bytes=slot_bytes_for(32, config.hidden_size, config.num_experts_per_tok))
        remote = RemoteExperts(placement, transport)
        reference = RemoteExperts(placement, InProcess([ExpertShard(path, s, placement, dtype=DTYPE, device="cuda")
                                                        for s in range(SHARDS)]), sync_free=True)
        generator = torch.Generator(device="cuda").manual_seed(1)
        layer = config.moe_layers[0]
        x = torch.randn(24, config.hidden_size, device="cuda", generator=generator).to(DTYPE)
        ids = torch.stack([torch.randperm(config.n_routed_experts, device="cuda", generator=generator)[
            :config.num_experts_per_tok] for _ in range(24)])
        weights = torch.rand(ids.shape, device="cuda", generator=generator)
        want = reference.combine(reference.dispatch(layer, x, weights, ids)).float()
        shards.kill(1)
        got = remote.combine(remote.dispatch(layer, x, weights, ids)).float()          # sent, failed, sent again
        assert remote.stats.rerouted > 0 and got.is_cuda
        assert (got - want).abs().max() <= 1e-2 * want.abs().max()
    finally:
        if transport is not None:
            transport.close()
        shards.stop()


# ---- no host round trip ------------------------------------------------------------------------------
def _serve_without_syncs(path: str, shard_id: int, placement_json: str, names, errors, stop) -> None:
    """A shard process: serve over the local transport with torch's sync debug mode raising on any sync."""
    placement = Placement.from_json(placement_json)
    shard = ExpertShard(path, shard_id, placement, dtype=DTYPE, device="cuda")
    layer = placement.moe_layers[0]                                    # warm up: Triton compiles, tables load
    shard.serve(ExpertBatch(layer, placement.version, torch.zeros(4, shard.hidden_size, dtype=DTYPE, device="cuda"),
                            None, torch.zeros(4, 2, dtype=torch.int32, device="cuda"),
                            torch.ones(4, 2, device="cuda")))
    torch.cuda.synchronize()

    def serve(batch: ExpertBatch) -> torch.Tensor:
        try:
            return shard.serve(batch)
        except RuntimeError as e:
            errors.put(str(e))
            raise

    torch.cuda.set_sync_debug_mode("error")
    server = LocalExpertServer(serve, f"expert shard {shard_id}")
    names.put((shard_id, server.name))
    stop.wait()
    torch.cuda.set_sync_debug_mode("default")        # freeing the replica's shared memory syncs
    server.close()


def test_dispatch_and_combine_never_wait_for_the_gpu(path, config):
    placement = build_placement(config.n_routed_experts, SHARDS, 2, config.moe_layers)
    context = multiprocessing.get_context("spawn")
    names, errors, stop = context.Queue(), context.Queue(), context.Event()
    processes = [context.Process(target=_serve_without_syncs, daemon=True,
                                 args=(str(path), s, placement.to_json(), names, errors, stop)) for s in range(SHARDS)]
    for process in processes:
        process.start()
    transport = None
    try:
        endpoints = dict(names.get(timeout=WAIT_S) for _ in range(SHARDS))
        transport = ExpertTransport({s: ShardEndpoint(f"unused:{s}", name, host_id(), local_cuda=True)
                                     for s, name in endpoints.items()}, mode="local", device="cuda",
                                    local_slot_bytes=slot_bytes_for(64, config.hidden_size, config.num_experts_per_tok))
        assert transport.on_device()
        remote = RemoteExperts(placement, transport)
        reference = RemoteExperts(placement, InProcess([ExpertShard(path, s, placement, dtype=DTYPE, device="cuda")
                                                        for s in range(SHARDS)]), sync_free=True)
        generator = torch.Generator(device="cuda").manual_seed(0)
        inputs = []
        for layer in config.moe_layers:
            for tokens in (7, 64):                                     # two micro-batches
                x = torch.randn(tokens, config.hidden_size, device="cuda", generator=generator).to(DTYPE)
                ids = torch.randint(0, config.n_routed_experts, (tokens, config.num_experts_per_tok),
                                    device="cuda", generator=generator, dtype=torch.int32)
                inputs.append((layer, x, torch.rand(ids.shape, device="cuda", generator=generator), ids))
        remote.combine(remote.dispatch(*inputs[0]))                    # warm up: tables copied to the GPU once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            handles = [remote.dispatch(*one) for one in inputs]       # every layer and micro-batch in flight
            outputs = [remote.combine(handle) for handle in handles]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert errors.empty(), errors.get()
        assert remote.stats.token_shards == SHARDS * remote.stats.tokens           # every row to every shard
        for one, got in zip(inputs, outputs):
            assert torch.equal(got, reference.combine(reference.dispatch(*one)))
    finally:
        stop.set()                                    # the shards leave sync-debug mode before the replica goes
        for process in processes:
            process.join(WAIT_S)
        if transport is not None:
            transport.close()


def test_a_gpu_batch_s_bad_choices_are_dropped_and_counted_not_checked_on_the_host(path, config):
    """Served unchecked (a check would sync): a choice of a slot out of range or EMPTY counts as -1 and
    adds to ``refused``; the other choices are served as usual."""
    placement = build_placement(config.n_routed_experts, 3, 0, config.moe_layers)      # S=3 leaves EMPTY slots
    layer, n = config.moe_layers[0], placement.slots_per_shard
    shard_id = next((s for s in range(3) if min(placement.local_experts(layer, s)) < 0), None)   # where the planner
    assert shard_id is not None, "3 shards of 32 experts should leave an EMPTY slot"               # left one
    shard = ExpertShard(path, shard_id, placement, dtype=DTYPE, device="cuda")
    empty = [s for s, e in enumerate(placement.local_experts(layer, shard_id)) if e < 0]
    good = torch.tensor([[0, 1], [2, -1], [1, 0]], dtype=torch.int32)
    assert not set(empty) & {0, 1, 2}, empty                             # the good choices hold experts
    bad = good.clone()
    bad[0, 1], bad[1, 1], bad[2, 0] = n + 5, empty[0], -7                # three bad choices
    x, weights = torch.randn(3, config.hidden_size).to(DTYPE), torch.rand(3, 2)
    expected = good.clone()
    expected[0, 1] = expected[2, 0] = -1
    batch = lambda slots: ExpertBatch(layer, placement.version, x.cuda(), None, slots.cuda(), weights.cuda())  # noqa: E731
    assert torch.equal(shard.serve(batch(bad)), shard.serve(batch(expected)))
    assert int(shard.refused) == 3
