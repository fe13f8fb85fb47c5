"""Logprobs of sampled tokens: log_softmax of the raw logits, for the rows that ask, whatever the sampler did."""
import pytest
import torch

from epserve.services.engine.engine import EngineConfig, LLMEngine
from epserve.services.engine.logprobs import token_logprobs
from epserve.services.engine.params import MAX_LOGPROBS, InvalidParam, SamplingParams

TOL = 1e-4


def _check_against(reference_logp: torch.Tensor, token: int, got, n: int) -> None:
    """``got`` (TokenLogprobs) against one row of reference logprobs [V]: the chosen token's, and n
    alternatives that are a top-n of the reference (ties may come in any order)."""
    assert got.logprob == pytest.approx(reference_logp[token].item(), abs=TOL)
    assert len(got.top) == n
    ids = [t for t, _ in got.top]
    assert len(set(ids)) == n
    for t, lp in got.top:
        assert lp == pytest.approx(reference_logp[t].item(), abs=TOL)
    if n:
        nth_best = reference_logp.topk(n).values[-1].item()
        assert min(lp for _, lp in got.top) >= nth_best - TOL
        assert [lp for _, lp in got.top] == sorted((lp for _, lp in got.top), reverse=True)


@pytest.mark.unit
def test_only_the_asking_rows_get_logprobs_of_the_raw_logits():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3      # [B, V]
    tokens = torch.tensor([3, 7, 11, 49])
    got = token_logprobs(logits, tokens, [None, 0, 5, MAX_LOGPROBS])
    reference = torch.log_softmax(logits.double(), dim=-1)
    assert got[0] is None
    for row, n in ((1, 0), (2, 5), (3, MAX_LOGPROBS)):
        _check_against(reference[row], tokens[row].item(), got[row], n)
    assert token_logprobs(logits, tokens, [None] * 4) == [None] * 4


@pytest.mark.unit
def test_more_alternatives_than_the_vocabulary_gives_the_whole_vocabulary():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    (got,) = token_logprobs(logits, torch.tensor([0]), [5])
    assert [t for t, _ in got.top] == [2, 1, 0]


@pytest.mark.unit
@pytest.mark.parametrize("value", [-1, MAX_LOGPROBS + 1, 1.5, True])
def test_logprobs_out_of_range_is_refused_naming_the_field(value):
    with pytest.raises(InvalidParam) as info:
        SamplingParams(logprobs=value).validate(vocab_size=100, max_new_tokens_allowed=50)
    assert info.value.field == "logprobs" and str(info.value).startswith("logprobs: ")


@pytest.mark.integration
def test_engine_logprobs_equal_log_softmax_of_the_models_logits(hf_checkpoints):
    """A batch mixing greedy, sampled (temperature, top-k: logprobs stay the raw model's) and not-asking
    requests; each token's logprobs against transformers' forward over the whole sequence."""
    from transformers import DeepseekV3ForCausalLM

    path = hf_checkpoints["groups_yarn"]
    engine = LLMEngine.from_path(path, EngineConfig(block_size=4, num_kv_blocks=64), dtype=torch.float32)
    prompts = [[5, 17, 42, 99, 3], [7], [(11 * i + 3) % 250 + 2 for i in range(13)]]
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3),
              SamplingParams(max_tokens=6, temperature=0.7, top_k=5, seed=3, ignore_eos=True, logprobs=MAX_LOGPROBS),
              SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)]
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", prompt, p)
    tokens: dict[str, list[int]] = {}
    logprobs: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            logprobs.setdefault(out.request_id, []).extend(out.logprobs or [None] * len(out.new_token_ids))
    assert logprobs["r2"] == [None] * 6

    model = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    for i in (0, 1):
        prompt, out = prompts[i], tokens[f"r{i}"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out])).logits[0, len(prompt) - 1:-1]     # [6, V]
        reference = torch.log_softmax(logits.double(), dim=-1)
        for step, (token, got) in enumerate(zip(out, logprobs[f"r{i}"])):
            _check_against(reference[step], token, got, params[i].logprobs)


@pytest.mark.gpu
def test_cuda_matches_cpu_at_the_v3_vocabulary():
    logits = torch.randn(6, 129280, generator=torch.Generator().manual_seed(1)) * 4       # [B, V]
    tokens = torch.randint(0, 129280, (6,), generator=torch.Generator().manual_seed(2))
    wanted = [None, 0, 5, MAX_LOGPROBS, 1, None]
    cpu = token_logprobs(logits, tokens, wanted)
    cuda = token_logprobs(logits.cuda(), tokens.cuda(), wanted)
    reference = torch.log_softmax(logits.double(), dim=-1)
    assert cuda[0] is None and cuda[5] is None
    for row in range(1, 5):
        assert cuda[row].logprob == pytest.approx(cpu[row].logprob, abs=TOL)
        _check_against(reference[row], tokens[row].item(), cuda[row], wanted[row])
