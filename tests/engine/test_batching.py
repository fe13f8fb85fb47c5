"""Continuous batching: results do not depend on what else is in the batch; blocks never leak."""
import pytest
import torch

from epserve.services.engine.engine import EngineConfig, LLMEngine
from epserve.services.engine.params import InvalidParam, SamplingParams
from epserve.services.engine.scheduler import ScheduledBatch

pytestmark = pytest.mark.integration

PROMPTS = [[5, 9, 200, 31], [7] * 19, [100 + i for i in range(37)], [3], [42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52]]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=40, seed=7, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(hf_checkpoints):
    return hf_checkpoints["groups_yarn"]


def make_engine(checkpoint, **overrides) -> LLMEngine:
    config = EngineConfig(**{"block_size": 4, "num_kv_blocks": 96, "max_num_batched_tokens": 16, **overrides})
    return LLMEngine.from_path(checkpoint, config, dtype=torch.float32)


def one_at_a_time(checkpoint, params):
    engine = make_engine(checkpoint)
    return [engine.generate([p], params)[0].output_ids for p in PROMPTS]


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_staggered_batch_with_abort_matches_one_at_a_time(checkpoint, params):
    expected = one_at_a_time(checkpoint, params)
    engine = make_engine(checkpoint)
    join_at_step = {0: [0, 1], 2: [2], 3: [3, 4]}     # requests join between steps
    outputs: dict[str, list[int]] = {}
    step = 0
    engine.add_request("victim", [11, 12, 13, 14, 15, 16], SamplingParams(max_tokens=50, ignore_eos=True))
    while step < 4 or engine.has_unfinished():
        for i in join_at_step.get(step, []):
            engine.add_request(f"r{i}", PROMPTS[i], params)
        if step == 5:
            assert engine.abort("victim").finish_reason == "abort"
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        step += 1
        assert step < 1000, f"the engine still has unfinished requests after {step} steps"
    assert [outputs[f"r{i}"] for i in range(len(PROMPTS))] == expected
    assert 0 < len(outputs["victim"]) < 50
    assert engine.blocks.num_used == 0 and engine.blocks.num_free == engine.blocks.num_blocks


def test_preemption_under_block_pressure_keeps_results(checkpoint):
    expected = one_at_a_time(checkpoint, GREEDY)
    engine = make_engine(checkpoint, num_kv_blocks=14, max_num_batched_tokens=64)   # 56 cache slots
    preempt, preempted = engine.scheduler._preempt, []
    engine.scheduler._preempt = lambda seq: preempted.append(seq.request_id) or preempt(seq)
    seqs = engine.generate(PROMPTS, GREEDY)
    assert preempted
    assert [s.output_ids for s in seqs] == expected
    assert engine.blocks.num_used == 0


def test_chunked_prefill_respects_token_budget(checkpoint):
    engine = make_engine(checkpoint, max_num_batched_tokens=8)
    schedule, batches = engine.scheduler.schedule, []
    engine.scheduler.schedule = lambda: batches.append(schedule()) or batches[-1]
    seqs = engine.generate([PROMPTS[2], PROMPTS[0]], GREEDY)
    assert all(b.num_tokens <= 8 for b in batches)
    long_chunks = [n for b in batches for s, n in b.prefills if s is seqs[0]]
    assert len(long_chunks) >= 5 and sum(long_chunks) == len(PROMPTS[2])
    assert [s.output_ids for s in seqs] == [one_at_a_time(checkpoint, GREEDY)[i] for i in (2, 0)]


def test_invalid_requests_name_the_field_and_leave_engine_serving(checkpoint):
    engine = make_engine(checkpoint)
    cases = [([], GREEDY, "prompt"), ([1, 99999], GREEDY, "prompt_ids"),
             ([1, 2], SamplingParams(max_tokens=0), "max_tokens"),
             ([1, 2], SamplingParams(temperature=-1), "temperature"),
             ([1, 2], SamplingParams(top_p=0), "top_p"), ([1, 2], SamplingParams(top_k=-3), "top_k"),
             ([1] * 400, GREEDY, "prompt")]
    for prompt, params, field in cases:
        with pytest.raises(InvalidParam) as err:
            engine.add_request("bad", prompt, params)
        assert err.value.field == field
    assert engine.generate([PROMPTS[0]], GREEDY)[0].output_ids == one_at_a_time(checkpoint, GREEDY)[0]


def test_stop_token_and_eos_finish_with_reason_stop(checkpoint):
    engine = make_engine(checkpoint)
    free_run = engine.generate([PROMPTS[1]], GREEDY)[0].output_ids
    stop_at = free_run[3]
    seq = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(stop_at,)))[0]
    assert seq.finish_reason == "stop" and seq.output_ids == free_run[: free_run.index(stop_at) + 1]


def test_a_step_splits_only_into_micro_batches_of_min_tokens(checkpoint):
    runner = make_engine(checkpoint, micro_batches=2, micro_batch_min_tokens=8).runner

    def split(decodes: int, chunks: list[int]) -> list[int]:
        batch = ScheduledBatch(decodes=[object() for _ in range(decodes)], prefills=[(object(), n) for n in chunks])
        return sorted(sum(group_chunks) for _, group_chunks, _ in runner._split(batch))

    assert split(15, []) == [15]                 # two groups would get 7 and 8 tokens
    assert split(16, []) == [8, 8]
    assert split(40, []) == [20, 20]             # never more than micro_batches
    assert split(0, [30]) == [30]                # one sequence is never split
    assert split(4, [12]) == [16]                 # balanced by tokens, the groups would get 2 and 14
    assert split(16, [8]) == [8, 16]


@pytest.mark.parametrize("micro_batches", [2, 3])
def test_micro_batches_give_the_same_tokens(checkpoint, micro_batches):
    engine = make_engine(checkpoint, micro_batches=micro_batches, micro_batch_min_tokens=1)
    assert [s.output_ids for s in engine.generate(PROMPTS, GREEDY)] == one_at_a_time(checkpoint, GREEDY)
