"""Placement that follows the cluster, under `epserve up`: a live rebalance and a shard fail-over, both during
16 concurrent greedy generations that must give the single-process engine's tokens."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from epserve.services.cluster.state import LoadStats, PlacementStore
from epserve.services.cluster.tensor_codec import from_proto
from epserve.services.engine.engine import EngineConfig, LLMEngine
from epserve.services.engine.params import SamplingParams
from tests.e2e.test_cluster import PROMPTS, UpCluster, generate_concurrently
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def model_dir(hf_checkpoints):
    return hf_checkpoints["groups_yarn"]


def single_process(model_dir, max_tokens: int) -> list[list[int]]:
    engine = LLMEngine.from_path(model_dir, EngineConfig(block_size=16, num_kv_blocks=512, micro_batches=1),
                                 dtype=torch.float32)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return [s.output_ids for s in engine.generate(PROMPTS, params)]


def measured_balancedness(served: torch.Tensor) -> float:
    """Mean over MoE layers of mean / max tokens per shard; ``served [rows, S]``."""
    return float((served.mean(dim=1) / served.max(dim=1).values).mean())


def flushed_tokens(up: UpCluster, placement) -> torch.Tensor:
    """[rows, S] tokens each shard served under ``placement``, as flushed to Redis (all of a released version)."""
    stats, served = LoadStats(up.redis, up.registry.keys), torch.zeros(len(placement.moe_layers), placement.num_shards)
    for shard in range(placement.num_shards):
        for (layer, _), tokens in stats.slot_load(shard, placement.version).items():
            served[placement.row(layer), shard] += tokens
    return served


def live_tokens(up: UpCluster, placement) -> torch.Tensor:
    """[rows, S] tokens each shard served under ``placement``, its newest version, counted now (GetShardInfo)."""
    served = torch.zeros(len(placement.moe_layers), placement.num_shards)
    for service in up.registry.live("expert"):
        info = up.shard_info(service)
        assert info.placement_version == placement.version
        served[:, info.shard_id] = from_proto(info.tokens_per_slot).sum(dim=1).float()
    return served


def test_a_rebalance_during_generation_switches_live_and_changes_no_token(model_dir):
    """Round 1 runs on the start-up placement (uniform load) and leaves its load in Redis; during round 2
    `epserve placement rebalance --force` switches to a placement planned from it; round 3 runs on that."""
    short, long = 64, 256                                      # round 2 runs long enough to switch in it
    want = single_process(model_dir, long)
    up = UpCluster(model_dir, attention=1, shards=3, redundant=2, flags=("--rebalance-interval", "0"))
    try:
        store = PlacementStore(up.redis, up.registry.keys)
        first = store.current()
        assert generate_concurrently(up, short, "round1") == [w[:short] for w in want]
        answers = []
        rebalance = [sys.executable, "-m", "epserve.services.cli", "placement", "rebalance", "--state-file",
                     up.state_file, "--force", "--timeout", "120"]
        run = lambda: answers.append(subprocess.run(rebalance, capture_output=True, text=True, timeout=180))  # noqa: E731
        assert generate_concurrently(up, long, "round2", while_running=run) == want
        assert answers[0].returncode == 0, answers[0].stderr
        second = store.current()
        assert second.version > first.version and f"switched to placement v{second.version}" in answers[0].stdout
        wait_until(lambda: all(s.info["placement_versions"] == [second.version] for s in up.registry.live("expert")),
                   60, "the old version released", state=lambda: [s.info for s in up.registry.live("expert")])
        assert generate_concurrently(up, short, "round3") == [w[:short] for w in want]
        before = measured_balancedness(flushed_tokens(up, first))      # v1 was released: flushed in full
        after = measured_balancedness(live_tokens(up, second))
        assert after > before, (before, after)
    finally:
        up.stop()


def test_a_dead_shard_s_experts_move_to_the_survivors_and_back(model_dir):
    """Shard 1 is SIGKILLed mid-generation and comes back only 20 s later: the controller places its experts on
    shards 0 and 2 (loaded from the checkpoint while the replica's steps wait), every request completes with the
    single-process tokens, and once shard 1 is back a recovery placement uses all three again."""
    max_tokens = 160
    want = single_process(model_dir, max_tokens)
    up = UpCluster(model_dir, attention=1, shards=3, redundant=2, flags=("--restart-delay", "20"))
    try:
        store = PlacementStore(up.redis, up.registry.keys)
        first = store.current().version
        kill = lambda: os.kill(up.service_pid("expert", "1"), signal.SIGKILL)  # noqa: E731
        assert generate_concurrently(up, max_tokens, "kill", while_running=kill) == want
        used = {v: store.get(v).shards_in_use() for v in range(first + 1, store.current().version + 1)}
        assert [0, 2] in used.values(), used                                    # the fail-over placement
        wait_until(lambda: store.current().shards_in_use() == [0, 1, 2] and store.current().version > first + 1, 120,
                   "a recovery placement with shard 1", state=lambda: (store.current().version,
                                                                       store.current().shards_in_use()))
        assert generate_concurrently(up, 16, "after") == [w[:16] for w in want]
    finally:
        up.stop()


def test_a_hung_shard_is_failed_over_without_waiting_out_the_dispatch_timeout(model_dir):
    """Shard 1 is SIGSTOPped mid-generation: nothing exits, its heartbeat stops. The controller places its
    experts on shards 0 and 2; the replica gives up the dispatch waiting on shard 1 as soon as it stages that
    placement (not after the 60 s dispatch timeout, which with 16 retries would outlast the clients' 240 s).
    After SIGCONT the shard gets slots again."""
    max_tokens = 160
    want = single_process(model_dir, max_tokens)
    up = UpCluster(model_dir, attention=1, shards=3, redundant=2)
    pid = up.service_pid("expert", "1")
    try:
        store = PlacementStore(up.redis, up.registry.keys)
        first = store.current().version
        assert generate_concurrently(up, max_tokens, "hang", while_running=lambda: os.kill(pid, signal.SIGSTOP)) == want
        assert store.current().shards_in_use() == [0, 2] and store.current().version > first
        os.kill(pid, signal.SIGCONT)
        wait_until(lambda: store.current().shards_in_use() == [0, 1, 2], 120, "a recovery placement with shard 1",
                   state=lambda: (store.current().version, store.current().shards_in_use()))
        assert generate_concurrently(up, 16, "after") == [w[:16] for w in want]
    finally:
        os.kill(pid, signal.SIGCONT)
        up.stop()
