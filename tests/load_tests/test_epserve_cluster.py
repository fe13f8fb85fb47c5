"""The harness against a local `epserve up` cluster (tiny model, small scale), and the fault scenario."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from epserve.load_tests.cli import main
from epserve.load_tests.results import SCHEMA
from epserve.services.up_state import wait_ready
from tests.e2e.test_cluster import free_ports
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

VLLM_FIELDS = (
    "date", "backend", "label", "model_id", "num_prompts", "request_rate", "burstiness", "max_concurrency",
    "duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
    "request_goodput", "output_throughput", "total_token_throughput", "max_output_tokens_per_s",
    "max_concurrent_requests", "input_lens", "output_lens", "ttfts", "itls", "latencies", "start_times", "errors",
    *(f"{stat}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "std", "p50", "p90",
                                                                            "p95", "p99")),
)


class Up:
    """`epserve up --model tiny` in a subprocess on a free port, with a state file."""

    def __init__(self, state_file: Path, attention: int = 1):
        self.port, http_port = free_ports(2)
        self.state_file = state_file
        self.process = subprocess.Popen(
            [sys.executable, "-m", "epserve.services.cli", "up", "--model", "tiny", "--port", str(self.port),
             "--http-port", str(http_port), "--attention", str(attention), "--state-file", str(state_file)],
            stdin=subprocess.DEVNULL)
        self.endpoint = wait_ready(state_file, self.process, timeout_s=240)["endpoint"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)


@pytest.fixture
def up(tmp_path_factory):
    cluster = Up(tmp_path_factory.mktemp("up") / "state.json")
    yield cluster
    cluster.stop()


def run(*args: str) -> None:
    assert main(["run", "--input-len", "uniform:8:24", "--output-len", "8", "--no-progress", *args]) == 0


def test_open_loop_run_against_a_cluster_writes_the_result_file(up, tmp_path):
    run("--endpoint", up.endpoint, "--request-rate", "8", "--num-prompts", "12", "--num-warmups", "2",
        "--slo", "ttft=5000,tpot=5000", "--seed", "3", "--out-dir", str(tmp_path))
    (path,) = tmp_path.glob("epserve-8.0qps-tiny-*.json")
    result = json.loads(path.read_text())
    assert result["schema"] == SCHEMA and set(VLLM_FIELDS) <= set(result)
    assert (result["completed"], result["failed"], result["num_sent"], result["num_warmups"]) == (12, 0, 12, 2)
    assert result["backend"] == "epserve" and result["model_id"] == "tiny" and result["request_rate"] == 8.0
    assert result["output_lens"] == [8] * 12 and result["total_output_tokens"] == 96
    assert [len(gaps) for gaps in result["itls"]] == [7] * 12
    assert all(0 < ttft < e2el for ttft, e2el in zip(result["ttfts"], result["latencies"]))
    assert [r["prompt_len"] for r in result["requests"]] == result["input_lens"]
    assert all(8 <= n <= 24 for n in result["input_lens"])
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    assert result["p99_ttft_ms"] >= result["p50_ttft_ms"] > 0
    (report,) = tmp_path.glob("*.html")
    assert "TTFT CDF" in report.read_text()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"           # a zombie has exited
    except FileNotFoundError:
        return False


def fault_run(up, tmp_path, service: str, fault_signal: str = "SIGKILL") -> tuple[dict, dict]:
    """The fault scenario against ``up``: 24 requests at 8 req/s, ``fault_signal`` sent to ``service`` at 1.5 s."""
    pids_before = set(int(p) for p in os.listdir("/proc") if p.isdigit())
    run("--endpoint", up.endpoint, "--request-rate", "8", "--num-prompts", "24", "--fault", f"{service}@1.5",
        "--fault-signal", fault_signal, "--recovery-bin", "0.5", "--up-state", str(up.state_file), "--request-timeout", "60", "--out-dir", str(tmp_path))
    (path,) = tmp_path.glob("*-fault-*.json")
    result = json.loads(path.read_text())
    fault = result["fault"]
    assert fault["service"] == service and fault["pid"] in pids_before
    assert fault["killed_at_s"] == pytest.approx(1.5, abs=0.2)
    wait_until(lambda: not _running(fault["pid"]), 60, f"pid {fault['pid']} to exit after {fault_signal}")
    assert result["completed"] + result["failed"] == 24
    assert len(fault["timeline"]["bin_start_s"]) == len(fault["timeline"]["output_tokens_per_s"])
    assert fault["baseline_output_tokens_per_s"] > 0
    assert "Throughput around the kill" in next(tmp_path.glob("*.html")).read_text()
    return result, fault


@pytest.mark.parametrize("service", ["expert:1", "attention:0", "router", "redis"])
def test_killing_a_shard_a_replica_the_router_or_redis_loses_no_request(up, tmp_path, service):
    """A shard: the replica runs its failed steps again once the shard is back. A replica: the router
    resubmits its requests, with their tokens so far, once it is back. The router: the SDK resumes
    each open stream on the restarted router, which continues it from Redis. Redis: services retry
    through its restart, the token log catches up (epserve up restarts them all)."""
    result, fault = fault_run(up, tmp_path, service)
    assert fault["failed_requests"] == result["failed"] == 0 and result["completed"] == 24


@pytest.mark.parametrize("fault_signal", ["SIGKILL", "SIGTERM"])
def test_a_replica_killed_or_drained_beside_another_loses_no_request(tmp_path, fault_signal):
    """Two replicas. SIGKILL of one: the router resumes its requests on the other. SIGTERM: the replica
    hands its requests to the other and exits."""
    up = Up(tmp_path / "state.json", attention=2)
    try:
        result, fault = fault_run(up, tmp_path / "out", "attention:0", fault_signal)
        assert fault["failed_requests"] == result["failed"] == 0 and result["completed"] == 24
    finally:
        up.stop()
