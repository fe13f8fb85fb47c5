"""A self-contained HTML report (inline SVG, no scripts) of one or more result files: summary table,
latency-throughput curves of a sweep, latency CDFs, and the throughput timeline of a fault run."""
from __future__ import annotations

import json
from datetime import datetime
from html import escape
from pathlib import Path

import numpy as np

from epserve.load_tests.metrics import METRICS
from epserve.load_tests.results import format_fault, load_name, run_name
from epserve.load_tests.svg import PALETTE, Series, chart

_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL"}
_CSS = """body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}
.charts{display:flex;flex-wrap:wrap;gap:8px}pre{background:#f7f7f7;padding:8px;font-size:12px}
p.note{font-size:12px;color:#555;max-width:1060px}"""


def _short_load(result: dict) -> str:
    """``2/s``, ``c4`` or ``2/s c4``: a point's label on a latency-throughput curve."""
    rate = "" if result["request_rate"] == "inf" else f"{result['request_rate']:g}/s"
    return " ".join(filter(None, [rate, f"c{result['max_concurrency']}" if result["max_concurrency"] else ""])) or "inf"


def _metric_values(result: dict, metric: str) -> list[float]:
    """A metric's values in ms over the run's successful requests."""
    if metric == "itl":
        return [g * 1000 for r, gaps in zip(result["requests"], result["itls"]) if r["status"] == "OK" for g in gaps]
    return [r[metric] * 1000 for r in result["requests"] if r["status"] == "OK" and r[metric] is not None]


def _cdf(values: list[float], points: int = 400) -> tuple[list[float], list[float]]:
    if not values:
        return [], []
    if len(values) <= points:
        xs = np.sort(values)
        ys = np.arange(1, len(xs) + 1) / len(xs)
    else:
        ys = np.linspace(0, 1, points)
        xs = np.quantile(values, ys)
    return [float(xs[0]), *xs.tolist()], [0.0, *ys.tolist()]


def summary_table(results: list[dict]) -> str:
    head = ["run", "load", "ok", "failed", "errors", "req/s", "out tok/s", "goodput"]
    head += [f"{_NAMES[m]} {s}" for m in METRICS for s in ("p50", "p99")]
    rows = []
    for r in results:
        errors = json.dumps(r["errors_by_status"]) if r["failed"] else ""
        cells = [run_name(r), load_name(r), r["completed"], r["failed"], errors,
                 r["request_throughput"], r["output_throughput"], r["request_goodput"]]
        cells += [r[f"{s}_{m}_ms"] for m in METRICS for s in ("p50", "p99")]
        rows.append("<tr>" + "".join(f"<td>{escape(_cell(c))}</td>" for c in cells) + "</tr>")
    return ("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"
            "<p class='note'>Latencies in ms; throughputs per second of the run's duration.</p>")


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def latency_throughput_charts(results: list[dict]) -> list[str]:
    """Per metric: p50 (solid) and p99 (dashed) against output token throughput, a line per group
    (runs with a fault are no steady state and are left out)."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        if "fault" not in r:
            groups.setdefault(run_name(r), []).append(r)
    charts = []
    for metric in METRICS:
        series = []
        for i, (name, runs) in enumerate(groups.items()):
            runs = sorted(runs, key=lambda r: r["output_throughput"])
            runs = [r for r in runs if r[f"p50_{metric}_ms"] is not None]
            xs = [r["output_throughput"] for r in runs]
            labels, color = [_short_load(r) for r in runs], PALETTE[i % len(PALETTE)]
            for stat, dashed in (("p50", False), ("p99", True)):
                series.append(Series(f"{name} {stat}", xs, [r[f"{stat}_{metric}_ms"] for r in runs],
                                     labels=labels, dashed=dashed, color=color))
        charts.append(chart(f"{_NAMES[metric]} vs throughput", series, "output tokens/s", f"{_NAMES[metric]} (ms)"))
    return charts


def cdf_charts(results: list[dict]) -> list[str]:
    charts = []
    for metric in METRICS:
        series = []
        for r in results:
            xs, ys = _cdf(_metric_values(r, metric))
            series.append(Series(f"{run_name(r)}, {load_name(r)}", xs, ys, step=True))
        charts.append(chart(f"{_NAMES[metric]} CDF", series, f"{_NAMES[metric]} (ms)", "fraction of values", y_top=1.0))
    return charts


def fault_chart(result: dict) -> str:
    fault = result["fault"]
    line = fault["timeline"]
    edges = [*line["bin_start_s"], line["bin_start_s"][-1] + line["bin_s"]]
    vlines = [(fault["killed_at_s"], f"kill {fault['service']}")]
    if fault["recovered"]:
        vlines.append((fault["killed_at_s"] + fault["time_to_recover_s"], "recovered"))
    series = [Series("output tok/s (succeeded)", edges, [*line["output_tokens_per_s"], line["output_tokens_per_s"][-1]],
                     step=True),
              Series("failures/s", edges, [*line["failures_per_s"], line["failures_per_s"][-1]], step=True,
                     color=PALETTE[1])]
    if fault["baseline_output_tokens_per_s"]:
        level = fault["baseline_output_tokens_per_s"] * fault["recovery_threshold"]
        series.append(Series(f"{fault['recovery_threshold']:.0%} of the pre-fault baseline", [0, edges[-1]],
                             [level, level], dashed=True, color="#888"))
    return chart(f"Throughput around the kill ({line['bin_s']:g} s bins)", series, "time since start (s)", "per second",
                 vlines=tuple(vlines))


def figures(results: list[dict]) -> list[tuple[str, str, str, str]]:
    """Every chart of the report as (section, file name stem, SVG, text shown beside it), in order."""
    out = []
    if sum("fault" not in r for r in results) > 1:
        out += [("Latency vs throughput", f"{m}_vs_throughput", svg, "")
                for m, svg in zip(METRICS, latency_throughput_charts(results))]
    out += [("Latency distributions (CDF)", f"{m}_cdf", svg, "") for m, svg in zip(METRICS, cdf_charts(results))]
    for i, r in enumerate(results):
        if "fault" in r and "killed_at_s" in r["fault"]:
            out.append((f"Fault: {r['fault']['service']} killed ({load_name(r)})", f"fault_{i}_timeline",
                        fault_chart(r), "\n".join(format_fault(r["fault"]))))
    return out


def build_report(results: list[dict], title: str = "epserve load test") -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title><style>{_CSS}</style>"
             f"</head><body><h1>{escape(title)}</h1><p class='note'>{len(results)} run(s); generated "
             f"{datetime.now():%Y-%m-%d %H:%M:%S}. Workload: {escape(json.dumps(results[0]['workload']))}; "
             f"model {escape(results[0]['model_id'])} at {escape(results[0]['endpoint'])}.</p>",
             "<h2>Summary</h2>", summary_table(results)]
    section = None
    for heading, _, svg, text in figures(results):
        if heading != section:
            parts += ["</div>"] if section else []
            parts += [f"<h2>{escape(heading)}</h2>", "<div class='charts'>"]
            section = heading
        parts += [svg, f"<pre>{escape(text)}</pre>" if text else ""]
    parts.append("</div>")
    parts += [f"<p>Fault: {escape(format_fault(r['fault'])[0])}</p>" for r in results
              if "fault" in r and "killed_at_s" not in r["fault"]]
    parts.append("<p class='note'>TTFT: first token; TPOT: (E2EL - TTFT) / (tokens - 1); ITL: gap between "
                 "consecutive tokens (tokens of one chunk are 0 apart); E2EL: last token. Definitions in "
                 "docs/load_testing.md.</p></body></html>")
    return "\n".join(parts)


def write_report(results: list[dict], out: Path, title: str = "epserve load test", svg_dir: Path | None = None) -> Path:
    """The HTML report at ``out``; with ``svg_dir``, also each chart as ``<name>.svg`` there."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(build_report(results, title))
    if svg_dir is not None:
        svg_dir.mkdir(parents=True, exist_ok=True)
        for _, name, svg, _ in figures(results):
            (svg_dir / f"{name}.svg").write_text(svg + "\n")
    return out
