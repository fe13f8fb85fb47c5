"""Run every benchmark on this machine's device and append the figures to docs/performance.md.

    python -m benchmarks.run_all                             # every benchmarks/bench_*.py
    python -m benchmarks.run_all --only gate_topk,fp8_gemm --out /tmp/perf.md
    python -m benchmarks.run_all --skip cluster --dry-run    # print the commands, run nothing

Each ``benchmarks/bench_<name>.py`` runs as a subprocess (never imported here) with the flags that
``BENCHES`` gives for the device (GPU shapes when torch sees a GPU, small quick ones on the CPU), its
own timeout, and on a GPU within an overall budget: the whole run ends within 8 minutes on an
H100/H200. A failing or hanging benchmark does not stop the others. Appended to ``--out``: one dated
section (UTC date, machine, torch/triton versions, commit with ``+dirty``), then per benchmark its
command and stdout verbatim, with the exit status and stderr's end when it failed. Each part is
written as its benchmark ends. A new ``--out`` file gets just this section: on a device machine use
``--out $OUT/run.md``, then append that file to docs/performance.md (figures are never rewritten).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_BUDGET_S = 450          # the whole GPU run, stops included, ends within 8 minutes (expected ~6.5)
STOP_GRACE_S = 15           # after SIGTERM to a timed-out benchmark's process group, before SIGKILL


@dataclass(frozen=True)
class Bench:
    cpu: str                # flags on the CPU (2 cores: small and quick)
    gpu: str                # flags on a GPU (H100/H200 shapes)
    cpu_timeout_s: int
    gpu_timeout_s: int
    needs_gpu: bool = False  # none does today: the kernel benchmarks time their torch paths on the CPU


# Run order: kernels first (what a GPU run is for), then the engine and the multi-process ones. On a
# GPU machine wire and transport run on its CPU; micro_batches' shards and cluster's services take the GPU.
BENCHES = {
    "gate_topk": Bench("--t 1 16 256 4096 --iters 20",
                       "--device cuda --t 1 4 16 64 256 1024 4096 --iters 100", 120, 60),
    "fp8_gemm": Bench("--m 1 16 --iters 5", "--device cuda --m 1 64 512 4096 --iters 50", 300, 120),
    "mla_decode": Bench("--batch 1 4 --seq-len 256 --heads 16 --iters 5",
                        "--device cuda --batch 1 32 128 --seq-len 1024 4096 --heads 128 16 --iters 50", 180, 120),
    "fused_moe": Bench("--tokens 1 16 64 --hidden 256 --inter 128 --experts 16 --iters 20",
                       "--device cuda --tokens 1 64 512 2048 --hidden 7168 --inter 2048 --experts 256 --iters 10",
                       300, 150),
    "engine": Bench("--batches 1,8,32 --new-tokens 64", "--device cuda --batches 1,8,32 --new-tokens 64", 600, 150),
    "wire": Bench("--batch 32 --steps 16", "--batch 32 --steps 16", 300, 90),
    "transport": Bench("--iters 20", "--iters 20", 300, 90),
    "placement": Bench("", "", 300, 60),
    "live_placement": Bench("", "--new-tokens 200", 600, 120),
    "micro_batches": Bench("--seqs 32,64,128,256 --steps 20", "--seqs 32,64,128 --steps 20", 600, 120),
    "cluster": Bench("--concurrency 1,8,32 --repeats 3", "--concurrency 1,8,32 --repeats 2 --min-seconds 1", 900, 180),
}
NEW_BENCH = Bench("", "", 300, 60)  # a bench_*.py not listed above: its defaults

PROBE = """import json, torch
try: import triton; tv = triton.__version__
except Exception: tv = None
c = torch.cuda.is_available()
print(json.dumps(dict(cuda=c, gpu=torch.cuda.get_device_name(0) if c else None,
                      gpus=torch.cuda.device_count() if c else 0, torch=torch.__version__,
                      torch_cuda=torch.version.cuda, triton=tv)))"""


def discover() -> list[str]:
    """Benchmark names (``bench_<name>.py``), in ``BENCHES`` order, then any new ones by name."""
    found = {p.stem.removeprefix("bench_") for p in (ROOT / "benchmarks").glob("bench_*.py")}
    return [n for n in BENCHES if n in found] + sorted(found - set(BENCHES))


def probe() -> dict:
    """torch/triton versions and the GPU, from a subprocess (so this process holds no CUDA context)."""
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise SystemExit(f"run_all: cannot import torch: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{names[0] if names else platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    try:
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def fenced(text: str, lang: str = "text") -> str:
    fence = "````" if "```" in text else "```"
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}\n"


def run_one(command: list[str], timeout_s: float) -> tuple[int | None, bool, float, str, str]:
    """Run ``command`` in its own process group; -> (exit status, timed out, seconds, stdout, stderr).
    On timeout the whole group (the benchmark and what it started) gets SIGTERM, then SIGKILL."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:                      # also on Ctrl-C: leave nothing of this benchmark running
            stop_group(proc)
        elapsed = time.monotonic() - start
        out.seek(0), err.seek(0)
        return (None if timed_out else proc.returncode, timed_out, elapsed,
                out.read().decode(errors="replace"), err.read().decode(errors="replace"))


def stop_group(proc: subprocess.Popen) -> None:
    """End what is left of the process group this script started for ``proc`` (group id = proc.pid):
    SIGTERM, up to STOP_GRACE_S for it to stop (``epserve up`` stops its services), then SIGKILL."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return                        # the benchmark ended and left nothing behind
    end = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < end and (proc.poll() is None or group_alive(proc.pid)):
        time.sleep(0.2)
    if group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def header(info: dict, device: str, argv: list[str], rev: str | None) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    gpu = f"{info['gpu']}" + (f" (x{info['gpus']})" if info["gpus"] > 1 else "")
    machine = f"{gpu}; host CPU {cpu_model()}" if device == "gpu" else f"CPU only: {cpu_model()}"
    cuda = f" (CUDA {info['torch_cuda']})" if info["torch_cuda"] else ""
    rev = rev or commit()
    return (f"\n### {now} · {info['gpu'] or cpu_model().split(',')[0]} · {rev}\n\n"
            f"- date: {now}\n- machine: {machine}\n"
            f"- software: Python {platform.python_version()}, torch {info['torch']}{cuda}, "
            f"triton {info['triton'] or 'not installed'}\n- commit: {rev}\n"
            f"- run: `{shlex.join(['python', '-m', 'benchmarks.run_all', *argv])}` ({device} settings)\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated names to run (e.g. gate_topk,fp8_gemm)")
    parser.add_argument("--skip", help="comma-separated names not to run")
    parser.add_argument("--out", default=str(ROOT / "docs" / "performance.md"), help="file to append to")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every timeout (and the GPU budget)")
    parser.add_argument("--commit", help="record this commit (default: git rev-parse; for a copy without .git)")
    args = parser.parse_args(argv)
    names = discover()
    only = set(args.only.split(",")) if args.only else set(names)
    skip = set(args.skip.split(",")) if args.skip else set()
    if unknown := (only | skip) - set(names):
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; known: {', '.join(names)}")
    args.names = [n for n in names if n in only and n not in skip]
    return args


def plan(names: list[str], gpu: bool, scale: float) -> list[tuple[str, list[str], float, str | None]]:
    """(name, command, timeout s, why it is not run or None) per benchmark."""
    steps = []
    for name in names:
        bench = BENCHES.get(name, NEW_BENCH)
        flags = shlex.split(bench.gpu if gpu else bench.cpu)
        timeout = (bench.gpu_timeout_s if gpu else bench.cpu_timeout_s) * scale
        why = "needs a GPU; this machine has none" if bench.needs_gpu and not gpu else None
        steps.append((name, ["python", "-m", f"benchmarks.bench_{name}", *flags], timeout, why))
    return steps


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    info = probe()
    device = "gpu" if info["cuda"] else "cpu"
    steps = plan(args.names, info["cuda"], args.timeout_scale)
    if args.dry_run:
        print(f"# device: {device} ({info['gpu'] or cpu_model()}); would append to {args.out}")
        for name, command, timeout, why in steps:
            print(f"# {name}: not run: {why}" if why else f"{shlex.join(command)}    # timeout {timeout:.0f} s")
        return 0

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(header(info, device, argv, args.commit))
    budget = GPU_BUDGET_S * args.timeout_scale if info["cuda"] else float("inf")
    deadline, failures = time.monotonic() + budget, 0
    for name, command, timeout, why in steps:
        left = deadline - time.monotonic()
        why = why or (f"the run's {budget:.0f} s budget on a GPU was spent" if left < 10 else None)
        if why:
            print(f"[run_all] {name}: not run: {why}", flush=True)
            part = f"\n#### {name}\n\nnot run: {why}.\n"
        else:
            timeout = min(timeout, left)
            print(f"[run_all] {shlex.join(command)} (timeout {timeout:.0f} s)", flush=True)
            rc, timed_out, elapsed, stdout, stderr = run_one([sys.executable, *command[1:]], timeout)
            status = f"timed out after {timeout:.0f} s (stopped)" if timed_out else f"exit {rc}" if rc else "ok"
            failures += status != "ok"
            print(f"[run_all] {name}: {status}, {elapsed:.1f} s", flush=True)
            part = f"\n#### {name}\n\n`{shlex.join(command)}` — {status}, {elapsed:.1f} s\n\n"
            part += fenced(stdout or "(no output)")
            if status != "ok" and stderr.strip():
                part += "\nstderr (last 30 lines):\n\n" + fenced("\n".join(stderr.rstrip().splitlines()[-30:]))
        with out.open("a") as f:
            f.write(part)
    print(f"[run_all] appended to {out}; {failures} of {len(steps)} failed or timed out")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
