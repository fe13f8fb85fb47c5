import math

import pytest
import torch

from epserve.services.engine.params import InvalidParam, SamplingParams, draw_seed
from epserve.services.engine.sampling import (
    filter_logits,
    gumbel_noise,
    sample,
    splitmix64,
    splitmix64_tensor,
)

pytestmark = pytest.mark.unit

VOCAB = 64


def _logits(rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 2.0  # [rows, vocab]


def _draws(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int = 1234) -> torch.Tensor:
    """n draws of one row, vectorised over steps 0..n-1. Returns [n] int64."""
    batch = logits_row[None, :].expand(n, -1)
    return sample(batch, [params] * n, [seed] * n, list(range(n)))


def _frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


def _slow_filter(scaled_row: list[float], top_k: int, top_p: float) -> set[int]:
    """Obviously-correct keep set: sort ids by (-logit, id), cut to k, then accumulate to top_p."""
    order = sorted(range(len(scaled_row)), key=lambda i: (-scaled_row[i], i))
    if top_k > 0:
        order = order[:top_k]
    weights = [math.exp(scaled_row[i] - scaled_row[order[0]]) for i in order]
    total = sum(weights)
    kept, mass = [], 0.0
    for i, w in zip(order, weights):
        if kept and (top_p < 1 and mass >= top_p):
            break
        kept.append(i)
        mass += w / total
    return set(kept)


# ---- greedy ---------------------------------------------------------------------------------


def test_greedy_is_argmax():
    logits = _logits(6)
    params = [SamplingParams(temperature=0.0)] * 6
    out = sample(logits, params, [1, 2, 3, 4, 5, 6], [0, 3, 1, 4, 1, 5])
    assert out.dtype == torch.int64
    assert torch.equal(out, torch.argmax(logits, dim=-1))


def test_greedy_ties_pick_lowest_id():
    logits = torch.zeros(1, 8)
    logits[0, [3, 5]] = 1.0
    assert sample(logits, [SamplingParams(temperature=0)], [0], [0]).item() == 3


def test_top_k_1_equals_greedy():
    logits = _logits(8)
    params = [SamplingParams(temperature=1.5, top_k=1)] * 8
    out = sample(logits, params, list(range(8)), list(range(8)))
    assert torch.equal(out, torch.argmax(logits, dim=-1))


def test_tiny_top_p_picks_top_token():
    logits = _logits(8)
    params = [SamplingParams(temperature=2.0, top_p=1e-6)] * 8
    out = sample(logits, params, list(range(8)), list(range(8)))
    assert torch.equal(out, torch.argmax(logits, dim=-1))


def test_tiny_temperature_does_not_overflow():
    logits = _logits(4) * 100
    out = sample(logits, [SamplingParams(temperature=1e-30)] * 4, [1, 2, 3, 4], [0, 0, 0, 0])
    assert torch.equal(out, torch.argmax(logits, dim=-1))


# ---- reproducibility and batch invariance ---------------------------------------------------


def test_same_seed_and_step_is_reproducible():
    logits = _logits(3)
    params = [SamplingParams(temperature=1.0)] * 3
    first = sample(logits, params, [7, 8, 9], [0, 1, 2])
    for _ in range(3):
        assert torch.equal(sample(logits.clone(), params, [7, 8, 9], [0, 1, 2]), first)


def test_batch_invariance():
    logits = _logits(5, seed=3)
    row = logits[1].clone()
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9)
    for seed, step in [(42, 0), (42, 17), (2**63 - 1, 5), (0, 123456)]:
        alone = sample(row[None, :], [params], [seed], [step]).item()
        # Same row at another position, among rows with other params, seeds, steps (incl. greedy).
        batch = torch.stack([logits[0], logits[2], logits[3], row, logits[4]])
        others = [
            SamplingParams(temperature=0.0),
            SamplingParams(temperature=1.3, top_p=0.5),
            SamplingParams(temperature=2.0),
            params,
            SamplingParams(temperature=0.5, top_k=3),
        ]
        out = sample(batch, others, [1, 2, 3, seed, 5], [9, 8, 7, step, 6])
        assert out[3].item() == alone


def test_batch_invariance_without_filtering():
    """A row that needs no top-k/top-p is unaffected by a batch neighbour that does."""
    logits = _logits(2, seed=4)
    plain = SamplingParams(temperature=1.0)
    for step in range(20):
        alone = sample(logits[:1], [plain], [11], [step]).item()
        mixed = sample(logits, [plain, SamplingParams(top_k=2)], [11, 12], [step, step])
        assert mixed[0].item() == alone


def test_different_steps_give_different_draws():
    flat = torch.zeros(VOCAB)  # uniform distribution: draws over steps should look random
    tokens = _draws(flat, SamplingParams(temperature=1.0), 2000, seed=5)
    assert len(set(tokens.tolist())) == VOCAB
    assert (tokens[1:] != tokens[:-1]).float().mean() > 0.9
    other_seed = _draws(flat, SamplingParams(temperature=1.0), 2000, seed=6)
    assert (tokens != other_seed).float().mean() > 0.9


def test_noise_is_independent_of_vocab_size_and_batch():
    keys = [1, 2**64 - 1, 12345]
    wide = gumbel_noise(keys, 100, "cpu")
    assert torch.equal(gumbel_noise(keys, 40, "cpu"), wide[:, :40])
    assert torch.equal(gumbel_noise(keys[1:2], 100, "cpu")[0], wide[1])


def test_splitmix64_tensor_matches_python():
    values = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 0x9E3779B97F4A7C15, 123456789123456789]
    signed = [v - 2**64 if v >= 2**63 else v for v in values]
    out = splitmix64_tensor(torch.tensor(signed, dtype=torch.long))
    assert [v & (2**64 - 1) for v in out.tolist()] == [splitmix64(v) for v in values]
    assert splitmix64(0) == 0  # reference value of the finalizer
    assert splitmix64(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF  # first splitmix64 output of seed 0


# ---- filtering ------------------------------------------------------------------------------


def test_top_k_never_leaves_the_top_k():
    logits = _logits(1, seed=7)[0]
    top5 = set(torch.topk(logits, 5).indices.tolist())
    tokens = _draws(logits, SamplingParams(temperature=3.0, top_k=5), 3000)
    assert set(tokens.tolist()) <= top5
    assert len(set(tokens.tolist())) == 5


@pytest.mark.parametrize(
    "top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.5), (10, 0.8), (3, 0.99), (1000, 0.3), (0, 1e-9)]
)
def test_filter_matches_slow_formulation(top_k, top_p):
    scaled = _logits(4, vocab=32, seed=top_k)
    scaled[2, :8] = 1.0  # ties: order by id
    out = filter_logits(scaled, torch.full((4,), top_k), torch.full((4,), top_p))
    for row in range(4):
        kept = set(torch.nonzero(torch.isfinite(out[row])).flatten().tolist())
        assert kept == _slow_filter(scaled[row].tolist(), top_k, top_p)
        assert torch.equal(out[row, sorted(kept)], scaled[row, sorted(kept)])


def test_filter_with_per_row_params():
    scaled = _logits(3, vocab=32, seed=9)
    top_k = torch.tensor([0, 4, 2])
    top_p = torch.tensor([0.6, 1.0, 0.9])
    out = filter_logits(scaled, top_k, top_p)
    for row in range(3):
        kept = set(torch.nonzero(torch.isfinite(out[row])).flatten().tolist())
        assert kept == _slow_filter(scaled[row].tolist(), int(top_k[row]), float(top_p[row]))


# ---- distribution ---------------------------------------------------------------------------


def _assert_close_to(freq: torch.Tensor, expected: torch.Tensor, n: int):
    sigma = torch.sqrt(expected * (1 - expected) / n)
    assert torch.all((freq - expected).abs() <= 5 * sigma + 1e-3), (freq, expected)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_empirical_distribution_matches_softmax(temperature):
    n, vocab = 20000, 10
    logits = torch.linspace(-2.0, 2.0, vocab)
    tokens = _draws(logits, SamplingParams(temperature=temperature), n)
    expected = torch.softmax(logits.double() / temperature, dim=-1)
    _assert_close_to(_frequencies(tokens, vocab), expected, n)


def test_empirical_distribution_with_top_k_and_top_p():
    n, vocab = 20000, 10
    logits = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0, -4.0])
    params = SamplingParams(temperature=1.0, top_k=6, top_p=0.8)
    kept = sorted(_slow_filter(logits.tolist(), 6, 0.8))
    expected = torch.zeros(vocab, dtype=torch.float64)
    expected[kept] = torch.softmax(logits[kept].double(), dim=-1)
    tokens = _draws(logits, params, n)
    _assert_close_to(_frequencies(tokens, vocab), expected, n)


# ---- validation -----------------------------------------------------------------------------

VALID = dict(vocab_size=100, max_new_tokens_allowed=50)


def test_valid_params_pass():
    SamplingParams().validate(**VALID)
    SamplingParams(max_tokens=50, temperature=0, top_p=0.1, top_k=5, seed=0, stop_token_ids=(0, 99)).validate(
        **VALID
    )
    SamplingParams(seed=2**63 - 1).validate(**VALID)


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", 0),
        ("max_tokens", 51),
        ("max_tokens", 2.5),
        ("temperature", -0.1),
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", math.nan),
        ("top_k", -1),
        ("top_k", 1.5),
        ("seed", -1),
        ("seed", 2**63),
        ("stop_token_ids", (5, 100)),
        ("stop_token_ids", (-1,)),
    ],
)
def test_validate_rejects_each_bad_field(field, value):
    params = SamplingParams(**{field: value})
    with pytest.raises(InvalidParam) as info:
        params.validate(**VALID)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert isinstance(info.value, ValueError)


def test_validate_message_format():
    with pytest.raises(InvalidParam, match=r"^top_p: must be in \(0, 1\], got 1.5$"):
        SamplingParams(top_p=1.5).validate(**VALID)


def test_params_properties():
    assert SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=0.1).greedy
    params = SamplingParams(stop_token_ids=[3, 4])
    assert params.stop_token_ids == (3, 4)
    hash(params)
    assert 0 <= draw_seed() < 2**63


def test_sample_rejects_mismatched_arguments():
    logits = _logits(2)
    with pytest.raises(ValueError, match="seeds"):
        sample(logits, [SamplingParams()] * 2, [1], [0, 0])
    with pytest.raises(ValueError, match="params"):
        sample(logits, [SamplingParams()], [1, 2], [0, 0])
    with pytest.raises(ValueError, match="logits"):
        sample(logits[0], [SamplingParams()], [1], [0])
    with pytest.raises(ValueError, match="steps"):
        sample(logits, [SamplingParams()] * 2, [1, 2], [0, -1])


@pytest.mark.gpu
def test_cuda_matches_cpu_and_is_batch_invariant():
    logits = _logits(64, vocab=129280, seed=1)
    params = [SamplingParams(temperature=0.9, top_k=50 * (i % 3), top_p=0.9 if i % 2 else 1.0) for i in range(64)]
    params[0] = SamplingParams(temperature=0)
    seeds, steps = list(range(100, 164)), list(range(64))
    cpu = sample(logits, params, seeds, steps)
    gpu = sample(logits.cuda(), params, seeds, steps)
    assert gpu.is_cuda
    assert (gpu.cpu() == cpu).float().mean() > 0.98  # device float differences may flip rare ties
    alone = sample(logits[5:6].cuda(), params[5:6], seeds[5:6], steps[5:6])
    assert alone.item() == gpu[5].item()


def test_finish_reason_of_the_tokens_so_far():
    """What ends a request, from its tokens alone (the engine after each token; a router resuming from a log)."""
    params = SamplingParams(max_tokens=4, stop_token_ids=(9,))
    eos = (2,)
    assert params.finish_reason([], eos) is None
    assert params.finish_reason([5, 6], eos) is None
    assert params.finish_reason([5, 2], eos) == "stop"                       # EOS
    assert params.finish_reason([5, 9], eos) == "stop"                       # a stop token id
    assert params.finish_reason([5, 6, 7, 8], eos) == "length"              # max_tokens
    assert params.finish_reason([5, 6], eos, context_full=True) == "length"
    assert SamplingParams(max_tokens=4, ignore_eos=True).finish_reason([5, 2], eos) is None
