"""The metric math on synthetic timings with known answers: TTFT, TPOT, ITL, E2EL, percentiles,
throughputs, goodput, and the fault scenario's recovery."""
from __future__ import annotations

import math

import numpy as np
import pytest

from epserve.load_tests.fault import Fault, analyse
from epserve.load_tests.metrics import RequestRecord, parse_slo, stats_ms, summarize

pytestmark = pytest.mark.unit


def record(index=0, start=0.0, times=(0.1, 0.2, 0.35, 0.5), tokens=(1, 1, 2, 1), status="OK", prompt_len=10):
    r = RequestRecord(index, start, 0.0, prompt_len, sum(tokens), output_len=sum(tokens),
                      chunk_times=list(times), chunk_tokens=list(tokens), status=status)
    r.end = times[-1] if times else 0.05
    return r


def test_ttft_e2el_tpot_of_one_request():
    r = record()
    assert r.ttft == pytest.approx(0.1)
    assert r.e2el == pytest.approx(0.5)
    assert r.tpot == pytest.approx((0.5 - 0.1) / (5 - 1))


def test_itl_counts_every_token_of_a_chunk_at_its_arrival():
    r = record()                                            # chunks of 1, 1, 2, 1 tokens
    assert r.itls == pytest.approx([0.1, 0.15, 0.0, 0.15])
    assert len(r.itls) == r.output_len - 1
    assert sum(r.itls) == pytest.approx(r.e2el - r.ttft)
    assert np.mean(r.itls) == pytest.approx(r.tpot)


def test_tokens_arriving_with_the_first_are_zero_apart():
    r = record(times=(0.2, 0.3), tokens=(3, 1))
    assert r.itls == pytest.approx([0.0, 0.0, 0.1])


def test_one_token_request_has_no_tpot_and_no_itl():
    r = record(times=(0.2,), tokens=(1,))
    assert r.tpot is None and r.itls == []
    assert r.meets({"tpot": 0.0})                           # counts as TPOT 0 for goodput, as vLLM


def test_failed_request_has_no_latencies():
    r = record(status="UNAVAILABLE")
    assert (r.ttft, r.tpot, r.e2el, r.itls) == (None, None, None, [])
    assert not r.meets({})


def test_percentiles_mean_median_std_on_1_to_100():
    stats = stats_ms("x", [v / 1000 for v in range(1, 101)])  # 1..100 ms
    assert stats["mean_x_ms"] == pytest.approx(50.5)
    assert stats["median_x_ms"] == pytest.approx(50.5)
    assert stats["std_x_ms"] == pytest.approx(math.sqrt((100 ** 2 - 1) / 12))
    assert stats["p50_x_ms"] == pytest.approx(50.5)
    assert stats["p90_x_ms"] == pytest.approx(90.1)          # linear interpolation: 1 + 0.90 * 99
    assert stats["p95_x_ms"] == pytest.approx(95.05)
    assert stats["p99_x_ms"] == pytest.approx(99.01)


def test_stats_of_nothing_are_none():
    assert set(stats_ms("ttft", []).values()) == {None}


def test_summary_throughputs_goodput_and_errors():
    records = [
        record(0, 0.0, (0.1, 0.2, 0.3), (1, 1, 1)),          # ttft 100 ms, tpot 100 ms, e2el 300 ms
        record(1, 0.2, (0.3, 0.4), (1, 1)),                   # ttft 300 ms, tpot 100 ms, e2el 400 ms
        record(2, 1.0, (0.1, 0.15, 0.2, 0.25), (1, 1, 1, 1)),  # ttft 100 ms, tpot 50 ms, e2el 250 ms
        record(3, 1.5, (), (), status="HTTP 503"),
        record(4, 1.6, (), (), status="UNAVAILABLE"),
        record(5, 1.7, (), (), status="HTTP 503"),
    ]
    s = summarize(records, duration_s=2.0, slo={"ttft": 200, "tpot": 80})
    assert (s["completed"], s["failed"]) == (3, 3)
    assert s["errors_by_status"] == {"HTTP 503": 2, "UNAVAILABLE": 1}
    assert s["total_input_tokens"] == 30 and s["total_output_tokens"] == 9
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(4.5)
    assert s["total_token_throughput"] == pytest.approx(19.5)
    assert s["request_goodput"] == pytest.approx(0.5)         # only request 2 meets both SLOs
    assert s["mean_ttft_ms"] == pytest.approx(500 / 3)
    assert s["median_e2el_ms"] == pytest.approx(300)
    assert s["mean_itl_ms"] == pytest.approx(np.mean([100, 100, 100, 50, 50, 50]))
    assert s["max_concurrent_requests"] == 2
    assert s["max_output_tokens_per_s"] == 5                  # tokens that arrived in second 0 of the run


def test_goodput_is_none_without_slo_and_e2el_slo_counts():
    records = [record(0, times=(0.1, 0.9), tokens=(1, 1)), record(1, times=(0.1, 0.2), tokens=(1, 1))]
    assert summarize(records, 1.0, {})["request_goodput"] is None
    assert summarize(records, 1.0, parse_slo("e2el=500"))["request_goodput"] == pytest.approx(1.0)


def test_parse_slo():
    assert parse_slo("ttft=500,tpot=50,e2el=2000") == {"ttft": 500.0, "tpot": 50.0, "e2el": 2000.0}
    for bad in ("ttft", "itl=5", "ttft=fast", "tpot=-1"):
        with pytest.raises(ValueError):
            parse_slo(bad)


def steady_records(fail_from: float, fail_until: float, end: float = 20.0) -> list[RequestRecord]:
    """A request sent every second, each streaming 10 tokens 0.1 s apart; those sent in
    [fail_from, fail_until) fail at once."""
    records = []
    for i, start in enumerate(np.arange(0.0, end + 1e-9, 1.0)):
        if fail_from <= start < fail_until:
            records.append(record(i, float(start), (), (), status="UNAVAILABLE"))
        else:
            records.append(record(i, float(start), tuple(0.05 + 0.1 * np.arange(10)), (1,) * 10))
    return records


def test_recovery_time_is_the_start_of_the_first_bin_back_after_the_dip():
    fault = analyse(steady_records(10, 13), killed_at_s=10.0, bin_s=1.0, threshold=0.8)
    assert fault["baseline_output_tokens_per_s"] == pytest.approx(10.0)
    assert fault["min_output_tokens_per_s_after"] == 0.0
    assert fault["recovered"] is True
    assert fault["time_to_recover_s"] == pytest.approx(3.0)
    assert fault["failed_after_fault"] == fault["failed_requests"] == 3
    assert fault["errors_by_status_after_fault"] == {"UNAVAILABLE": 3}
    assert fault["sent_after_fault"] == 11 and fault["succeeded_after_fault"] == 8


def test_the_stall_is_the_fault_to_the_next_token_of_requests_in_flight():
    def record(index, start, chunks):
        return RequestRecord(index, start, 0.0, 8, len(chunks), len(chunks), list(chunks), [1] * len(chunks),
                             end=chunks[-1])

    records = [record(0, 9.0, [0.5, 1.5, 3.2]), record(1, 9.5, [0.2, 0.4, 2.5, 2.6]), record(2, 11.0, [0.1, 0.2])]
    fault = analyse(records, 10.0, 1.0, 0.8)
    assert fault["in_flight_at_fault"] == 2
    assert (fault["stall_p50_s"], fault["stall_max_s"]) == (pytest.approx(1.25), pytest.approx(2.0))  # 0.5 and 2.0
    assert analyse(records[2:], 10.0, 1.0, 0.8)["stall_max_s"] is None


def test_a_later_noisy_bin_does_not_undo_the_recovery():
    records = [r for r in steady_records(10, 13) if not 16 <= r.start_time < 17]    # one quiet second later
    assert analyse(records, 10.0, 1.0, 0.8)["time_to_recover_s"] == pytest.approx(3.0)


def test_no_dip_recovers_at_once_and_a_dead_service_never():
    assert analyse(steady_records(99, 99), 10.0, 1.0, 0.8)["time_to_recover_s"] == 0.0
    dead = analyse(steady_records(10, 99), 10.0, 1.0, 0.8)
    assert dead["recovered"] is False and dead["time_to_recover_s"] is None


def test_fault_spec():
    assert Fault.parse("expert:1@10") == Fault("expert:1", 10.0)
    assert Fault.parse("router@2.5s") == Fault("router", 2.5)
    for bad in ("expert:1", "gpu:0@3", "expert:x@3", "router@soon"):
        with pytest.raises(ValueError):
            Fault.parse(bad)
