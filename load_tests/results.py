"""The result file of one run (schema in docs/load_testing.md) and its text summaries.

Field names follow ``vllm bench serve --save-result --save-detailed`` where the two overlap, so tools
that read vLLM result files read these; what vLLM lacks is added under names of its own.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from epserve.load_tests.metrics import METRICS, PERCENTILES, RequestRecord

SCHEMA = "epserve-load-tests/1"
_LABELS = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
           "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}


def _r(value: float) -> float:
    return round(value, 6)


def request_entry(r: RequestRecord, slo: dict[str, float]) -> dict:
    return {
        "index": r.index, "status": r.status, "error": r.error, "start_time": _r(r.start_time),
        "queue_time": _r(r.queue_time), "prompt_len": r.prompt_len, "requested_output_len": r.requested_output_len,
        "output_len": r.output_len, "ttft": r.ttft, "tpot": r.tpot, "e2el": r.e2el, "end": _r(r.end),
        "good": r.meets(slo) if slo else None,
        "chunk_times": [_r(t) for t in r.chunk_times], "chunk_tokens": r.chunk_tokens,
    }


def build_result(setup: dict, summary: dict, records: list[RequestRecord], fault: dict | None) -> dict:
    """Setup, summary metrics, vLLM's per-request columns, our per-request records and the fault."""
    ok = [r.success for r in records]
    result = {"schema": SCHEMA, **setup, **summary}
    result.update({
        "input_lens": [r.prompt_len for r in records],
        "output_lens": [r.output_len if s else 0 for r, s in zip(records, ok)],
        "ttfts": [r.ttft if s else 0.0 for r, s in zip(records, ok)],
        "itls": [[_r(g) for g in r.itls] for r in records],
        "latencies": [r.e2el if s else 0.0 for r, s in zip(records, ok)],
        "start_times": [_r(r.start_time) for r in records],
        "queue_times": [_r(r.queue_time) for r in records],
        "errors": [r.error if not s else "" for r, s in zip(records, ok)],
        "requests": [request_entry(r, setup["slo"]) for r in records],
    })
    if fault is not None:
        result["fault"] = fault
    return result


def run_name(result: dict) -> str:
    """The label, and the backend when the label is not just the backend."""
    return result["label"] if result["label"] == result["backend"] else f"{result['label']} ({result['backend']})"


def load_name(result: dict) -> str:
    """``rate 2 req/s``, ``concurrency 4``, or both."""
    parts = [] if result["request_rate"] == "inf" else [f"rate {result['request_rate']:g} req/s"]
    if result["max_concurrency"]:
        parts.append(f"concurrency {result['max_concurrency']}")
    return ", ".join(parts) or "all at once"


def result_path(result: dict, out_dir: Path) -> Path:
    """``{label}-{rate}qps[-concurrency{C}][-fault]-{model}-{date}.json``, as vLLM names its files."""
    name = f"{result['label']}-{result['request_rate']}qps"
    if result["max_concurrency"]:
        name += f"-concurrency{result['max_concurrency']}"
    if "fault" in result:
        name += "-fault"
    return out_dir / f"{name}-{Path(result['model_id']).name or 'model'}-{result['date']}.json"


def write_result(result: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = result_path(result, out_dir)
    path.write_text(json.dumps(result, indent=None, separators=(",", ":")) + "\n")
    return path


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def format_summary(result: dict) -> str:
    """The run's summary in ``vllm bench serve``'s layout."""
    rows = [("Successful requests:", result["completed"]), ("Failed requests:", result["failed"])]
    rows += [(f"  {status}:", n) for status, n in result["errors_by_status"].items()]
    rows += [("Load:", load_name(result)), ("Benchmark duration (s):", result["duration"]),
             ("Total input tokens:", result["total_input_tokens"]),
             ("Total generated tokens:", result["total_output_tokens"]),
             ("Request throughput (req/s):", result["request_throughput"])]
    if result["request_goodput"] is not None:
        rows.append(("Request goodput (req/s):", result["request_goodput"]))
    rows += [("Output token throughput (tok/s):", result["output_throughput"]),
             ("Peak output token throughput (tok/s):", result["max_output_tokens_per_s"]),
             ("Peak concurrent requests:", result["max_concurrent_requests"]),
             ("Total token throughput (tok/s):", result["total_token_throughput"])]
    lines = ["{:=^60}".format(f" Load test: {run_name(result)} ")]
    lines += [f"{k:<44} {_fmt(v)}" for k, v in rows]
    for metric in METRICS:
        lines.append(f"{_LABELS[metric]:-^60}")
        for stat in ("mean", "median", "std", *(f"p{p}" for p in PERCENTILES)):
            lines.append(f"{f'{stat.capitalize()} {metric.upper()} (ms):':<44} {_fmt(result[f'{stat}_{metric}_ms'])}")
    if "fault" in result:
        lines.append("{:-^60}".format(" Fault "))
        lines += format_fault(result["fault"])
    lines.append("=" * 60)
    return "\n".join(lines)


def format_fault(fault: dict) -> list[str]:
    if "killed_at_s" not in fault:
        return [f"{fault['service']} was not killed: {fault['not_killed']}"]
    recovery = ("not measurable (no baseline or no full bin after the kill)" if fault["recovered"] is None else
                f"after {fault['time_to_recover_s']:g} s" if fault["recovered"] else "not within the run")
    rows = [("Killed:", f"{fault['service']} (pid {fault['pid']}, {fault['signal']}) at {fault['killed_at_s']:.2f} s"),
            ("Failed requests (all / after the kill):", f"{fault['failed_requests']} / {fault['failed_after_fault']}"),
            ("In flight at the kill (failed):", f"{fault['in_flight_at_fault']} ({fault['in_flight_failed']})"),
            ("Stall, kill to next token (p50 / max s):",
             f"{_fmt(fault.get('stall_p50_s'))} / {_fmt(fault.get('stall_max_s'))}"),
            ("Sent after the kill (succeeded):", f"{fault['sent_after_fault']} ({fault['succeeded_after_fault']})"),
            ("Errors after the kill:", json.dumps(fault["errors_by_status_after_fault"])),
            ("Baseline output tok/s:", _fmt(fault["baseline_output_tokens_per_s"])),
            ("Lowest output tok/s after the kill:", _fmt(fault["min_output_tokens_per_s_after"])),
            (f"Recovery to {fault['recovery_threshold']:.0%} of baseline:", recovery)]
    return [f"{k:<44} {v}" for k, v in rows]


def format_sweep(results: list[dict]) -> str:
    """One line per run: load, counts, throughputs, p50/p99 latencies (ms)."""
    head = ["load", "ok", "failed", "req/s", "out tok/s", "goodput", "TTFT p50", "p99", "TPOT p50", "p99",
            "ITL p50", "p99", "E2EL p50", "p99"]
    rows = [head]
    for r in results:
        row = [load_name(r), r["completed"], r["failed"], r["request_throughput"], r["output_throughput"],
               r["request_goodput"]]
        row += [r[f"{stat}_{m}_ms"] for m in METRICS for stat in ("p50", "p99")]
        rows.append([_fmt(v) for v in row])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)


def rate_field(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate
