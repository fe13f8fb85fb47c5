"""What the kernel benchmarks share: their common flags, timing, the H100 peaks, table and CSV output.

Importing this module turns the Triton interpreter on when there is no GPU (for ``--triton`` on
the CPU); the variable is read when triton loads, so import it before anything from ``kernels``.
"""
import argparse
import csv
import os
import statistics
import time
from collections.abc import Callable

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# H100 SXM: HBM3 bandwidth and dense tensor-core throughput per dtype.
H100_HBM_BYTES_PER_S = 3.35e12
H100_PEAK_FLOPS = {"bf16": 989e12, "fp8": 1979e12}

_L2_FLUSH_BYTES = 256 * 1024 * 1024


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by ``doc``'s first line, with the flags every kernel benchmark takes."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--triton", action="store_true",
                        help="also time Triton on the CPU (the interpreter: slow, not meaningful)")
    parser.add_argument("--csv", metavar="PATH", help="also write the rows to this CSV file")
    return parser


def time_ms(fn: Callable[[], object], device: torch.device, iters: int, *, warmup: int = 1,
            graph_calls: int | None = None, flush_l2: bool = False) -> float:
    """Median milliseconds of one ``fn()`` over ``iters`` timed runs, after ``warmup`` calls.

    On the CPU each run is a plain call timed with ``perf_counter``, and the CUDA options below
    are ignored. On CUDA runs are timed with events:

    - ``graph_calls=n``: ``n`` calls of ``fn`` are captured in one CUDA graph and each run is a
      replay, its time divided by ``n``, so Python launch cost drops out. ``None``: plain launches.
    - ``flush_l2``: a 256 MB memset before each run (as triton's do_bench does), so every run
      starts with a cold L2; the memset is not timed.
    """
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        return statistics.median(_cpu_times(fn, iters))
    if graph_calls is None:
        return statistics.median(_cuda_times(fn, device, iters, flush_l2))
    graph = _capture(fn, graph_calls)
    return statistics.median(_cuda_times(graph.replay, device, iters, flush_l2)) / graph_calls


def _cpu_times(fn: Callable[[], object], iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _cuda_times(fn: Callable[[], object], device: torch.device, iters: int, flush_l2: bool) -> list[float]:
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device) if flush_l2 else None
    times = []
    for _ in range(iters):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return times


def _capture(fn: Callable[[], object], calls: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``calls`` calls of ``fn``, after a warm-up on a side stream as capture requires."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """Print ``rows`` as right-aligned columns under a header (default columns: the first row's keys)."""
    columns = columns or list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r[c]).rjust(widths[c]) for c in columns))


def write_csv(path: str, rows: list[dict], columns: list[str] | None = None) -> None:
    """Write ``rows`` to ``path`` as CSV with a header (default columns: the first row's keys)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
