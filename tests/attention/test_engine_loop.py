"""The attention replica's engine loop: a failed step runs again (same tokens), and gives up on a request
only after ``step_retries`` failed steps; a loop that stops progressing is reported NOT_SERVING."""
import queue
import threading

import grpc
import pytest
import torch

from epserve.services.attention import engine_loop
from epserve.services.attention.engine_loop import EngineLoop, StepError
from epserve.services.attention.main import watch_progress
from epserve.services.cluster.grpc_server import start_aio_grpc_server
from epserve.services.engine.config import EngineConfig
from epserve.services.engine.engine import LLMEngine
from epserve.services.engine.params import SamplingParams
from epserve.services.model.moe import ExpertBackend, LocalExperts
from epserve.services.model.tiny import tiny_model_path
from tests.waiting import wait_until

pytestmark = pytest.mark.unit

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17]]
PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


class FlakyExperts(ExpertBackend):
    """In-process experts whose dispatch raises on the calls numbered in ``failing`` (an expert shard gone)."""

    def __init__(self, experts: LocalExperts, failing: set[int]):
        self.experts, self.failing, self.calls = experts, failing, 0
        self.on_failure = None

    def dispatch(self, layer, x, topk_weights, topk_ids):
        self.calls += 1
        if self.calls in self.failing:
            if self.on_failure is not None:
                self.on_failure()
            raise ConnectionError(f"expert shard 1: the shard closed the connection (call {self.calls})")
        return self.experts.dispatch(layer, x, topk_weights, topk_ids)

    def combine(self, handle):
        return self.experts.combine(handle)


def engine_with(make_backend):
    """A tiny engine whose every MoE layer uses ``make_backend(its in-process experts)``; -> (engine, backend)."""
    engine = LLMEngine.from_path(tiny_model_path(), EngineConfig(micro_batches=1), dtype=torch.float32)
    backend = make_backend(engine.model.model.layers[1].mlp.backend)
    for layer in engine.model.model.layers:
        if hasattr(layer.mlp, "backend"):
            layer.mlp.backend = backend
    return engine, backend


@pytest.fixture(scope="module")
def reference():
    engine = LLMEngine.from_path(tiny_model_path(), EngineConfig(micro_batches=1), dtype=torch.float32)
    return [s.output_ids for s in engine.generate(PROMPTS, PARAMS)]


def run(failing: set[int], step_retries: int, monkeypatch, backoff_s: float = 0.01,
        between_steps=None, on_failure=None) -> tuple[dict, FlakyExperts]:
    monkeypatch.setattr(engine_loop, "BACKOFF_S", backoff_s)
    monkeypatch.setattr(engine_loop, "MAX_BACKOFF_S", max(backoff_s, engine_loop.MAX_BACKOFF_S))
    engine, flaky = engine_with(lambda experts: FlakyExperts(experts, failing))
    loop = EngineLoop(engine, step_retries=step_retries, between_steps=between_steps).start()
    flaky.on_failure = on_failure and (lambda: on_failure(loop))
    outputs = {f"r{i}": queue.Queue() for i in range(len(PROMPTS))}
    for (request_id, out), prompt in zip(outputs.items(), PROMPTS):
        loop.submit(request_id, prompt, PARAMS, out)
    results = {}
    try:
        for request_id, out in outputs.items():
            tokens = []
            while True:
                item = out.get(timeout=60)
                if isinstance(item, StepError):
                    results[request_id] = item
                    break
                tokens += item.new_token_ids
                if item.finished:
                    results[request_id] = tokens
                    break
    finally:
        loop.stop()
    return results, flaky


def test_failed_steps_run_again_and_give_the_same_tokens(reference, monkeypatch):
    results, flaky = run({3, 4, 5, 20}, step_retries=8, monkeypatch=monkeypatch)  # 3 failed steps in a row, then 1
    assert [results[f"r{i}"] for i in range(len(PROMPTS))] == reference
    assert flaky.calls > 20


def test_a_new_placement_runs_a_failed_step_again_without_waiting_out_its_backoff(reference, monkeypatch):
    """The backoff is an hour; the failing dispatch stages a placement and wakes the loop (as the attention
    service does when a fail-over placement is committed): the step runs again at once."""
    staged = []

    def between_steps():
        switched = bool(staged)
        staged.clear()
        return switched

    def on_failure(loop):
        staged.append("v2")
        loop.wake()

    results, _ = run({3}, step_retries=8, monkeypatch=monkeypatch, backoff_s=3600, between_steps=between_steps,
                     on_failure=on_failure)
    assert [results[f"r{i}"] for i in range(len(PROMPTS))] == reference


def test_a_request_fails_after_too_many_failed_steps(monkeypatch):
    results, _ = run(set(range(3, 10_000)), step_retries=2, monkeypatch=monkeypatch)    # the shard never returns
    assert all(isinstance(r, StepError) for r in results.values())
    assert all("engine step failed 3 times" in r.message and "expert shard 1" in r.message for r in results.values())


@pytest.mark.parametrize("params", [PARAMS, SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=1234,
                                                           ignore_eos=True)], ids=["greedy", "seeded"])
def test_a_resumed_request_continues_with_the_tokens_of_an_undisturbed_run(params):
    """What the router's resume relies on: prompt + the tokens emitted so far (``emitted_ids``), on
    another engine, give the rest of an undisturbed run's tokens (sampling is keyed by seed and position)."""
    def engine():
        return LLMEngine.from_path(tiny_model_path(), EngineConfig(micro_batches=1), dtype=torch.float32)

    (undisturbed,) = [s.output_ids for s in engine().generate([PROMPTS[2]], params)]
    for emitted in (1, 5, 11):
        resumed = engine()
        resumed.add_request("r", PROMPTS[2], params, emitted_ids=undisturbed[:emitted])
        seq = resumed.requests["r"]
        while not seq.finished:
            resumed.step()
        assert seq.output_ids == undisturbed


def test_a_resumed_request_near_the_context_limit_is_accepted():
    """Emitted tokens count towards max_tokens, not on top of it (found by review: a resume was refused)."""
    engine = LLMEngine.from_path(tiny_model_path(), EngineConfig(micro_batches=1), dtype=torch.float32)
    capacity = min(engine.max_model_len, engine.blocks.num_blocks * engine.blocks.block_size)
    params = SamplingParams(max_tokens=capacity - len(PROMPTS[0]), temperature=0)
    loop = EngineLoop(engine, step_retries=0)                      # not started: submit only validates
    loop.submit("r", PROMPTS[0], params, queue.Queue(), emitted_ids=[5, 6, 7])
    with pytest.raises(ValueError, match="emitted_ids"):
        loop.submit("r2", PROMPTS[0], SamplingParams(max_tokens=3), queue.Queue(), emitted_ids=[5, 6, 7])


class BlockingExperts(FlakyExperts):
    """In-process experts whose dispatch waits until ``release`` is set (a hung engine)."""

    def __init__(self, experts: LocalExperts):
        super().__init__(experts, set())
        self.release = threading.Event()

    def dispatch(self, layer, x, topk_weights, topk_ids):
        self.release.wait(60)
        return super().dispatch(layer, x, topk_weights, topk_ids)


def test_a_stalled_loop_reports_not_serving_until_it_progresses_again():
    """The replica's health (what the liveness probe asks) follows the engine loop's progress."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    engine, blocking = engine_with(BlockingExperts)
    loop = EngineLoop(engine, step_retries=0).start()
    server = start_aio_grpc_server(lambda s: None, ["epserve.v1.AttentionService"])
    stop = threading.Event()
    watcher = threading.Thread(target=watch_progress, args=(loop, server, 0.3, stop, 0.05))
    watcher.start()

    def status():
        with grpc.insecure_channel(server.address) as channel:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status

    try:
        assert loop.stalled_s() == 0.0
        out = queue.Queue()
        loop.submit("r0", PROMPTS[0], PARAMS, out)
        wait_until(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, 30, "NOT_SERVING")
        assert loop.stalled_s() > 0.3
        blocking.release.set()
        wait_until(lambda: status() == health_pb2.HealthCheckResponse.SERVING, 30, "SERVING again")
    finally:
        blocking.release.set()
        stop.set()
        watcher.join(timeout=10)
        loop.stop()
        server.stop(None)
