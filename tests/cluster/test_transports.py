"""One conformance suite for every expert transport that runs on the CPU (grpc, local, nixl).

Expert shards run as separately started ``epserve serve expert`` processes against a real Redis;
this process is the attention side. Every transport must give exactly the same outputs (the same
shard process computes them), equal to the in-process shard within float32 noise, over every MoE
layer and two micro-batches in flight; refuse what it cannot carry with a clear error; and, with
the registry behind it, reach a shard again after it was killed and restarted.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import uuid

import pytest
import redis
import torch

from epserve.services.cluster import local_transport, nixl_transport, transport as transport_module
from epserve.services.cluster.expert_batch import ExpertBatch
from epserve.services.cluster.expert_channel import TransportStats
from epserve.services.cluster.local_transport import LocalChannel, LocalExpertServer
from epserve.services.cluster.keys import Keys
from epserve.services.cluster.registry import Registry
from epserve.services.cluster.state import choose_placement
from epserve.services.cluster.transport import ExpertShardError, ExpertTransport, ShardEndpoint
from epserve.services.config import ExpertConfig, serve_command
from epserve.services.expert.shard import ExpertShard
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

SHARDS, REDUNDANT = 2, 2
TRANSPORTS = ("grpc", "local", pytest.param("nixl", marks=pytest.mark.skipif(
    not nixl_transport.available(), reason="NIXL (nixl-cu12) is not installed")))
WAIT_S = 60


class Shards:
    """``SHARDS`` expert shard processes of one cluster, and the registry they are in."""

    def __init__(self, path, redis_url: str, redundant: int = REDUNDANT, **settings):
        self.path, self.redis_url, self.cluster = path, redis_url, f"t-{uuid.uuid4().hex[:8]}"
        self.redundant, self.settings = redundant, settings          # settings: more ExpertConfig fields
        self.registry = Registry(redis.Redis.from_url(redis_url), Keys(self.cluster))
        self.processes = {shard: self._start(shard) for shard in range(SHARDS)}
        self.wait_registered()

    def _start(self, shard: int) -> subprocess.Popen:
        settings = {"dtype": "float32", "device": "cpu", **self.settings}
        config = ExpertConfig(redis=self.redis_url, cluster=self.cluster, model=str(self.path), expert_shards=SHARDS,
                              redundant_experts=self.redundant, shard_id=shard, **settings)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        return subprocess.Popen(serve_command(config), env=env, stdin=subprocess.DEVNULL)

    def endpoints(self) -> dict[int, ShardEndpoint]:
        return {int(s.service_id): ShardEndpoint.from_service(s) for s in self.registry.live("expert")
                if s.pid == self.processes[int(s.service_id)].pid}

    def wait_registered(self) -> None:
        wait_until(lambda: len(self.endpoints()) == SHARDS, WAIT_S, "every shard process to register",
                   state=lambda: [(p.pid, p.poll()) for p in self.processes.values()])

    def kill(self, shard: int) -> None:
        self.processes[shard].kill()
        self.processes[shard].wait(WAIT_S)

    def start_again(self, shard: int) -> None:
        self.processes[shard] = self._start(shard)
        self.wait_registered()

    def stop(self) -> None:
        """SIGTERM (after SIGCONT, for a test that stopped one) to every shard; each must exit within WAIT_S
        (TimeoutExpired otherwise, once every shard has exited or been killed)."""
        for process in self.processes.values():
            process.send_signal(signal.SIGCONT)
            process.send_signal(signal.SIGTERM)
        late = []
        for process in self.processes.values():
            try:
                process.wait(WAIT_S)
            except subprocess.TimeoutExpired as err:
                process.kill()
                process.wait(WAIT_S)
                late.append(err)
        if late:
            raise late[0]


@pytest.fixture(scope="module")
def shards(path, redis_server):
    # no placement controller: one would re-place a killed shard's experts (a new version) while the
    # restart test waits, and the test's batches name the first version
    running = Shards(path, redis_server.url, controller=False)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def placement(shards, config):
    return choose_placement(shards.registry.client, shards.registry.keys, num_experts=config.n_routed_experts,
                            num_shards=SHARDS, redundant=REDUNDANT, moe_layers=config.moe_layers)


@pytest.fixture(scope="module")
def in_process(path, placement):
    """The same shards, in this process: the reference outputs."""
    return [ExpertShard(path, shard, placement, dtype=torch.float32) for shard in range(SHARDS)]


def make_transport(shards: Shards, mode: str, **kwargs) -> ExpertTransport:
    transport = ExpertTransport(shards.endpoints(), mode=mode, resolve=lambda s: shards.endpoints().get(s), **kwargs)
    assert {transport.kind(s) for s in range(SHARDS)} == {mode}
    return transport


def random_batch(placement, config, layer: int, rows: int, generator: torch.Generator) -> ExpertBatch:
    """``rows`` tokens with top-k local slots of a shard (some -1: another shard's) and their weights."""
    k, slots = config.num_experts_per_tok, placement.slots_per_shard
    topk = torch.randint(0, slots, (rows, k), generator=generator, dtype=torch.int32)
    topk[torch.rand(rows, k, generator=generator) < 0.3] = -1
    return ExpertBatch(layer, placement.version, torch.randn(rows, config.hidden_size, generator=generator), None,
                       topk, torch.rand(rows, k, generator=generator))


def every_layer_two_micro_batches(placement, config) -> list[tuple[int, ExpertBatch]]:
    """(shard, batch) for every shard, MoE layer and 2 micro-batches of different sizes; all in flight at once."""
    generator = torch.Generator().manual_seed(7)
    return [(shard, random_batch(placement, config, layer, rows, generator))
            for layer in config.moe_layers for rows in (5, 17) for shard in range(SHARDS)]


@pytest.mark.parametrize("mode", TRANSPORTS)
def test_every_layer_and_micro_batch_matches_the_in_process_shard(shards, placement, config, in_process, mode):
    work = every_layer_two_micro_batches(placement, config)
    transport = make_transport(shards, mode)
    try:
        futures = [transport.send(shard, batch) for shard, batch in work]     # all in flight
        for (shard, batch), future in zip(work, futures):
            got, want = future.result(timeout=WAIT_S), in_process[shard].serve(batch)
            assert got.shape == want.shape and got.dtype == want.dtype
            assert (got - want).abs().max().item() <= 1e-5
        sent = transport.stats.bytes_sent
        assert sum(transport.stats.messages.values()) == len(work) and all(sent[s] > 0 for s in range(SHARDS))
    finally:
        transport.close()


def test_every_transport_gives_the_same_bits(shards, placement, config):
    work = every_layer_two_micro_batches(placement, config)
    outputs = {}
    for mode in ("grpc", "local", "nixl") if nixl_transport.available() else ("grpc", "local"):
        transport = make_transport(shards, mode)
        try:
            outputs[mode] = [transport.send(shard, batch).result(timeout=WAIT_S) for shard, batch in work]
        finally:
            transport.close()
    first, *others = outputs.values()
    assert all(torch.equal(a, b) for other in others for a, b in zip(first, other))


@pytest.mark.parametrize("mode", TRANSPORTS)
def test_a_batch_the_shard_refuses_fails_naming_the_field_and_the_shard_keeps_serving(shards, placement, config, mode):
    generator = torch.Generator().manual_seed(1)
    good = random_batch(placement, config, config.moe_layers[0], 3, generator)
    bad = random_batch(placement, config, 0, 3, generator)                        # a dense layer
    transport = make_transport(shards, mode)
    try:
        with pytest.raises(ExpertShardError, match="expert shard 0: layer: 0 is not a MoE layer"):
            transport.send(0, bad).result(timeout=WAIT_S)
    finally:
        transport.close()
    transport = make_transport(shards, mode)                                      # the shard still serves
    try:
        assert transport.send(0, good).result(timeout=WAIT_S).shape == (3, config.hidden_size)
    finally:
        transport.close()


@pytest.mark.parametrize("mode", TRANSPORTS)
def test_an_oversize_batch_is_refused_before_it_is_sent(shards, placement, config, mode):
    transport = make_transport(shards, mode, local_slot_bytes=64 << 10, max_message_bytes=64 << 10)
    try:
        big = random_batch(placement, config, config.moe_layers[0], 1024, torch.Generator().manual_seed(2))
        with pytest.raises(ValueError, match="expert shard 1: a batch of 1024 tokens"):
            transport.send(1, big)
        small = random_batch(placement, config, config.moe_layers[0], 4, torch.Generator().manual_seed(3))
        assert transport.send(1, small).result(timeout=WAIT_S).shape == (4, config.hidden_size)
    finally:
        transport.close()


@pytest.mark.parametrize("mode", TRANSPORTS)
def test_an_answer_the_replica_cannot_read_fails_its_batches_and_the_next_send_reconnects(
        shards, placement, config, mode, monkeypatch):
    """A failure while reading an answer (on a GPU a CUDA error copying it out of its slot; no memory; an output
    that does not decode) fails the batches in flight with the shard's name, instead of ending the reader with
    them left waiting; the channel is broken, and the next send goes through a new one."""
    batch = random_batch(placement, config, config.moe_layers[0], 4, torch.Generator().manual_seed(11))
    transport = make_transport(shards, mode)

    def fail(*args, **kwargs):
        raise RuntimeError("copy-out failed")

    try:
        expected = transport.send(0, batch).result(timeout=WAIT_S)
        with monkeypatch.context() as patch:
            patch.setattr(LocalChannel, "_take_output", fail)               # the local and nixl channels
            patch.setattr(transport_module, "from_proto", fail)             # the gRPC channel
            in_flight = [transport.send(0, batch) for _ in range(2)]
            for future in in_flight:
                with pytest.raises(ExpertShardError, match="expert shard 0 .*copy-out failed"):
                    future.result(timeout=10)
        assert transport.send(0, batch).result(timeout=WAIT_S).equal(expected)
    finally:
        transport.close()


@pytest.mark.parametrize("mode", TRANSPORTS)
def test_a_killed_and_restarted_shard_is_reached_again(shards, placement, config, in_process, mode):
    generator = torch.Generator().manual_seed(4)
    batch = random_batch(placement, config, config.moe_layers[-1], 6, generator)
    transport = make_transport(shards, mode)
    try:
        assert transport.send(1, batch).result(timeout=WAIT_S).shape == (6, config.hidden_size)
        before = shards.endpoints()[1]
        shards.kill(1)
        with pytest.raises(ExpertShardError, match="expert shard 1"):
            transport.send(1, batch).result(timeout=WAIT_S)     # its channel broke, and nothing answers there
        shards.start_again(1)
        after = shards.endpoints()[1]
        assert after != before                                  # a new registration: new port, new socket
        got = transport.send(1, batch).result(timeout=WAIT_S)    # a new channel, from the registry
        assert (got - in_process[1].serve(batch)).abs().max().item() <= 1e-5
        assert transport.endpoints[1] == after
    finally:
        transport.close()


def test_a_closed_local_server_takes_no_new_replica():
    server = LocalExpertServer(lambda batch: batch.hidden, "echo")
    name = server.name
    server.close()
    with pytest.raises(ExpertShardError, match="cannot connect|hello failed"):
        LocalChannel(0, name, 1 << 16, TransportStats())


def test_slot_views_made_once_and_made_again_past_the_limit_carry_every_batch_exactly(monkeypatch):
    """Both ends reuse tensor views per batch layout; a cache that starts over (LIMIT) makes them again."""
    monkeypatch.setattr(local_transport.SlotViews, "LIMIT", 3)
    server = LocalExpertServer(lambda batch: batch.hidden * 2 + batch.topk_weights.sum(1, keepdim=True).to(batch.hidden.dtype)
                               + batch.topk_slots.sum(1, keepdim=True), "doubling")
    channel = LocalChannel(0, server.name, 1 << 16, TransportStats())
    generator = torch.Generator().manual_seed(3)
    try:
        for rows in [1, 2, 3, 1, 5, 2, 8, 1, 3] * 2:
            for dtype in (torch.float32, torch.bfloat16):
                hidden = torch.randn(rows, 16, generator=generator).to(dtype)
                slots = torch.randint(-1, 4, (rows, 2), generator=generator, dtype=torch.int32)
                weights = torch.rand(rows, 2, generator=generator)
                expected = hidden * 2 + weights.sum(1, keepdim=True).to(dtype) + slots.sum(1, keepdim=True)
                got = channel.send(ExpertBatch(1, 1, hidden, None, slots, weights)).result(timeout=WAIT_S)
                assert got.dtype == dtype and got.equal(expected)
    finally:
        channel.close(timeout_s=5)
        server.close()


def test_a_shard_that_holds_every_slot_breaks_the_channel(monkeypatch):
    """Hung but connected (its socket open, no answer): senders do not wait for a slot for ever."""
    monkeypatch.setattr(local_transport, "SLOT_WAIT_S", 0.5)
    release = threading.Event()
    server = LocalExpertServer(lambda batch: release.wait(30) and batch.hidden, "hung")
    channel = LocalChannel(0, server.name, 1 << 16, TransportStats())
    try:
        batch = ExpertBatch(1, 1, torch.ones(2, 8), None, torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, 1))
        held = [channel.send(batch) for _ in range(local_transport.SLOTS)]      # the shard holds them all
        late = channel.send(batch)
        with pytest.raises(ExpertShardError, match="not answering"):
            late.result(timeout=WAIT_S)
        assert channel.broken and all(f.done() for f in held)
    finally:
        release.set()
        channel.close(timeout_s=5)
        server.close()


def test_a_malformed_answer_breaks_the_channel_and_fails_its_batch():
    """An answer with a status no shard sends: its batch fails naming the problem, and the channel is broken
    (so the transport opens a new one) before the batch's caller learns of it."""
    class Garbling(LocalExpertServer):
        def _answer(self, header, views, peer=None):
            seq = local_transport._REQUEST.unpack(header)[0]
            return local_transport._RESPONSE.pack(seq, 9, 0), 0

    server = Garbling(lambda batch: batch.hidden, "garbling")
    channel = LocalChannel(0, server.name, 1 << 16, TransportStats())
    try:
        future = channel.send(ExpertBatch(1, 1, torch.ones(2, 8), None, torch.zeros(2, 1, dtype=torch.int32),
                                          torch.ones(2, 1)))
        with pytest.raises(ExpertShardError, match="malformed response to batch 0 .status 9"):
            future.result(timeout=WAIT_S)
        assert channel.broken
    finally:
        channel.close(timeout_s=5)
        server.close()
