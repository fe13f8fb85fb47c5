"""The arrival process (mean rate and burstiness over many samples, seeded) and the workloads."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from epserve.load_tests.arrivals import arrival_times
from epserve.load_tests.workloads import (
    LengthDist,
    make_sharegpt,
    prefix_requests,
    random_requests,
    sharegpt_requests,
    token_counter,
)

pytestmark = pytest.mark.unit

N = 40_001


@pytest.mark.parametrize("rate", [0.5, 5.0, 200.0])
@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gaps_have_the_mean_rate_and_the_burstiness_cv(rate, burstiness):
    gaps = np.diff(arrival_times(N, rate, burstiness, np.random.default_rng(7)))
    assert 1 / gaps.mean() == pytest.approx(rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.04)


def test_burstiness_1_is_poisson_counts_per_window():
    times = arrival_times(N, 10.0, 1.0, np.random.default_rng(3))
    counts = np.bincount(times.astype(int))[:-1]            # arrivals per whole second
    assert counts.mean() == pytest.approx(10.0, rel=0.03)
    assert counts.var() == pytest.approx(10.0, rel=0.1)     # Poisson: variance = mean


def test_seeded_first_at_zero_and_infinite_rate():
    a = arrival_times(100, 3.0, 0.5, np.random.default_rng(1))
    assert np.array_equal(a, arrival_times(100, 3.0, 0.5, np.random.default_rng(1)))
    assert not np.array_equal(a, arrival_times(100, 3.0, 0.5, np.random.default_rng(2)))
    assert a[0] == 0.0 and np.all(np.diff(a) >= 0)
    assert np.array_equal(arrival_times(5, math.inf, 1.0, np.random.default_rng(1)), np.zeros(5))
    with pytest.raises(ValueError):
        arrival_times(5, 1.0, 0.0, np.random.default_rng(1))


def test_length_distributions():
    rng = np.random.default_rng(0)
    assert set(LengthDist.parse("16").sample(rng, 50)) == {16}
    uniform = LengthDist.parse("uniform:4:8").sample(rng, 5000)
    assert uniform.min() == 4 and uniform.max() == 8
    assert LengthDist.parse("normal:100:10").sample(rng, 20000).mean() == pytest.approx(100, rel=0.01)
    assert np.median(LengthDist.parse("lognormal:50:0.5").sample(rng, 20000)) == pytest.approx(50, rel=0.03)
    assert LengthDist.parse("normal:2:50").sample(rng, 1000).min() >= 1
    for bad in ("0", "uniform:5", "uniform:9:3", "gauss:1:2", "normal:a:b"):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)


def test_random_prompts_are_seeded_and_in_range():
    def make():
        return random_requests(50, LengthDist.parse("uniform:3:9"), LengthDist.parse("7"), (3, 100),
                               np.random.default_rng(5))

    specs = make()
    assert specs == make()
    assert all(3 <= len(s.prompt) <= 9 and s.prompt_len == len(s.prompt) and s.output_len == 7 for s in specs)
    assert all(3 <= t < 100 for s in specs for t in s.prompt)


def test_prefix_groups_share_their_prefix():
    specs = prefix_requests(40, 4, 16, LengthDist.parse("5"), LengthDist.parse("8"), (3, 500), np.random.default_rng(0))
    prefixes = {tuple(s.prompt[:16]) for s in specs}
    assert len(prefixes) == 4
    assert all(len(s.prompt) == 21 for s in specs)
    assert sorted(sum(tuple(s.prompt[:16]) == p for s in specs) for p in prefixes) == [10, 10, 10, 10]


def test_sharegpt_generator_and_loader(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(make_sharegpt(30, seed=1)))
    assert make_sharegpt(30, seed=1) == json.loads(path.read_text())
    specs = sharegpt_requests(path, 50, token_counter("bytes"), 4096, None, np.random.default_rng(0))
    assert len(specs) == 50                                 # 30 conversations, drawn again to make 50
    assert all(isinstance(s.prompt, str) and s.prompt_len == len(s.prompt.encode()) for s in specs)
    replies = {len(c["conversations"][1]["value"].encode()) for c in make_sharegpt(30, seed=1)}
    assert {s.output_len for s in specs} <= replies
    fixed = sharegpt_requests(path, 5, token_counter("bytes"), 4096, LengthDist.parse("9"), np.random.default_rng(0))
    assert {s.output_len for s in fixed} == {9}
    with pytest.raises(ValueError, match="no usable conversation"):
        sharegpt_requests(path, 5, token_counter("bytes"), 8, None, np.random.default_rng(0))
