"""The harness against a small OpenAI-compatible streaming server written for the test: real HTTP on
loopback (chunked SSE, keep-alive), through the same code path as the epserve target."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from epserve.load_tests.cli import main

pytestmark = pytest.mark.integration

STEP_S = 0.02                          # the server's time per chunk
CHUNK_TOKENS = (1, 2)                  # chunks alternate 1 and 2 tokens
REFUSED_SEEDS = {3, 7, 11}             # answered 503
BROKEN_SEED = 5                        # fails inside the stream after its first chunk


class FakeCompletions(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    connections: set = set()

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _event(self, body: dict | str) -> None:
        data = f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n".encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def do_GET(self) -> None:
        self.connections.add(self.client_address)
        self._send(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    def do_POST(self) -> None:
        self.connections.add(self.client_address)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/completions" and body["stream"] and body["model"] == "fake-model"
        if body["seed"] in REFUSED_SEEDS:
            return self._send(503, {"error": {"message": "overloaded", "code": 503}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent, k = 0, 0
        while sent < body["max_tokens"]:
            time.sleep(STEP_S)
            n = min(CHUNK_TOKENS[k % 2], body["max_tokens"] - sent)
            self._event({"choices": [{"index": 0, "text": "ab"[:n], "token_ids": list(range(sent, sent + n))}]})
            sent, k = sent + n, k + 1
            if body["seed"] == BROKEN_SEED:
                self._event({"error": {"message": "engine died", "code": 500}})
                break
        else:
            self._event({"choices": [], "usage": {"prompt_tokens": len(body["prompt"]) + 1, "completion_tokens": sent}})
        self._event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture
def server():
    FakeCompletions.connections = set()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeCompletions)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def run(server: str, out_dir, *extra: str) -> list[dict]:
    code = main(["run", "--target", "openai", "--endpoint", server, "--vocab-size", "1000", "--num-prompts", "12",
                 "--input-len", "uniform:4:8", "--output-len", "6", "--max-concurrency", "4", "--out-dir", str(out_dir),
                 "--no-progress", *extra])
    assert code == 0
    return sorted((json.loads(p.read_text()) for p in out_dir.glob("*.json")), key=lambda r: str(r["request_rate"]))


def test_openai_stream_metrics_errors_and_result_file(server, tmp_path):
    (result,) = run(server, tmp_path, "--slo", "ttft=1000,tpot=1000", "--seed", "0")
    assert result["backend"] == "openai" and result["model_id"] == "fake-model"
    assert (result["completed"], result["failed"]) == (8, 4)
    assert result["errors_by_status"] == {"HTTP 500": 1, "HTTP 503": 3}
    assert result["max_concurrency"] == 4 and result["request_rate"] == "inf"
    ok = [r for r in result["requests"] if r["status"] == "OK"]
    assert [r["index"] for r in result["requests"] if r["status"] != "OK"] == [3, 5, 7, 11]
    for r, itls, input_len in zip(result["requests"], result["itls"], result["input_lens"]):
        if r["status"] == "OK":
            assert r["output_len"] == 6 and r["chunk_tokens"] == [1, 2, 1, 2]
            assert len(itls) == 5 and itls.count(0.0) == 2      # the second token of each 2-token chunk
            assert r["ttft"] >= STEP_S and r["e2el"] >= 4 * STEP_S
            assert sum(itls) == pytest.approx(r["e2el"] - r["ttft"], abs=1e-5)
            assert input_len == r["prompt_len"] and 5 <= input_len <= 9   # the server's count: prompt + 1
    assert result["total_output_tokens"] == 6 * len(ok)
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    assert result["mean_tpot_ms"] == pytest.approx(result["mean_itl_ms"], rel=1e-3)
    assert len(FakeCompletions.connections) < 12                # keep-alive connections were reused
    (report,) = tmp_path.glob("*.html")
    assert report.read_text().count("<svg") == 4                 # one run: the four CDFs


def test_openai_sweep_over_rates(server, tmp_path):
    results = run(server, tmp_path, "--request-rate", "20,40", "--no-report")
    assert [r["request_rate"] for r in results] == [20.0, 40.0]
    assert all(r["completed"] + r["failed"] == 12 and r["num_sent"] == 12 for r in results)
    due = [[s - q for s, q in zip(r["start_times"], r["queue_times"])] for r in results]
    assert due[0] == pytest.approx([2 * t for t in due[1]], abs=1e-5)   # the same seeded gaps, twice as fast


def test_unreachable_server_exits_1(tmp_path):
    assert main(["run", "--target", "openai", "--endpoint", "http://127.0.0.1:9", "--vocab-size", "10",
                 "--out-dir", str(tmp_path), "--no-progress"]) == 1
