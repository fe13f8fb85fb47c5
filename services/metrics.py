"""Prometheus metrics of every service, named like vLLM's under ``epserve:`` (no torch: the router imports it).

Each service process serves ``/metrics`` on ``--metrics-port`` (``serve_metrics``) and advertises
``metrics_address`` in its registry entry. What each kind exports:

- router: ``time_to_first_token_seconds``, ``time_per_output_token_seconds``,
  ``e2e_request_latency_seconds``, ``request_queue_time_seconds`` (histograms);
  ``num_requests_running``, ``num_requests_waiting`` (gauges); ``prompt_tokens_total``,
  ``generation_tokens_total``, ``request_success_total{finished_reason}``,
  ``request_refused_total{code}`` (counters).
- attention replica: ``kv_cache_usage_perc``, ``engine_requests_running``,
  ``engine_requests_waiting`` (gauges); ``expert_dispatch_seconds{shard, layer}`` (histogram: send
  to result of one MoE layer's batch on one shard).
- expert shard: ``expert_tokens_total{layer, slot}``, ``expert_choices_dropped_total`` (choices of GPU
  batches served unchecked that named a slot out of range or empty) (counters), ``placement_version`` (gauge); the
  leading placement controller: ``placement_balancedness`` (expected, by the window's load).

``helm/epserve/dashboards/epserve.json`` (a Grafana dashboard the chart ships) queries only these.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0)
DISPATCH_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# ---- router ------------------------------------------------------------------------------------------
TTFT = Histogram("epserve:time_to_first_token_seconds", "Time to the first generated token", buckets=LATENCY_BUCKETS)
TPOT = Histogram("epserve:time_per_output_token_seconds", "Time per output token after the first",
                 buckets=LATENCY_BUCKETS)
E2E = Histogram("epserve:e2e_request_latency_seconds", "Request latency, admission to the last token",
                buckets=LATENCY_BUCKETS)
QUEUE_TIME = Histogram("epserve:request_queue_time_seconds", "Time a request waited for a replica",
                       buckets=LATENCY_BUCKETS)
RUNNING = Gauge("epserve:num_requests_running", "Requests this router streams from replicas")
WAITING = Gauge("epserve:num_requests_waiting", "Requests waiting in this router's admission queue")
PROMPT_TOKENS = Counter("epserve:prompt_tokens", "Prompt tokens of requests admitted")
GENERATION_TOKENS = Counter("epserve:generation_tokens", "Tokens generated")
SUCCESS = Counter("epserve:request_success", "Requests finished, by finish reason", ["finished_reason"])
REFUSED = Counter("epserve:request_refused", "Requests refused at admission, by gRPC status", ["code"])
for _reason in ("stop", "length", "abort"):                      # exported (at 0) before the first of each
    SUCCESS.labels(_reason)
for _code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED"):
    REFUSED.labels(_code)

# ---- attention replica -----------------------------------------------------------------------------
KV_USAGE = Gauge("epserve:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)")
ENGINE_RUNNING = Gauge("epserve:engine_requests_running", "Requests the engine is running")
ENGINE_WAITING = Gauge("epserve:engine_requests_waiting", "Requests waiting in the engine's scheduler")
DISPATCH = Histogram("epserve:expert_dispatch_seconds", "One MoE layer's batch on one shard, sent to result",
                     ["shard", "layer"], buckets=DISPATCH_BUCKETS)
REROUTED = Counter("epserve:expert_rows_rerouted", "Token rows sent again to other copies of their experts, "
                   "because their shard failed or straggled", ["reason"])

# ---- expert shard ----------------------------------------------------------------------------------
PLACEMENT_VERSION = Gauge("epserve:placement_version", "Newest placement version this shard holds")
BALANCEDNESS = Gauge("epserve:placement_balancedness",
                     "Expected mean / max shard load of the current placement by the window's load (leader only)")


class _ExpertCounters:
    """``expert_tokens_total{layer, slot}`` and ``expert_choices_dropped_total``, read from the shard's own
    counters when scraped (counting per batch into a metric would cost the shard a device sync per batch
    on a GPU)."""

    def __init__(self, tokens: Callable[[], dict[tuple[int, int], int]], dropped: Callable[[], int]):
        self.tokens, self.dropped = tokens, dropped

    def collect(self):
        family = CounterMetricFamily("epserve:expert_tokens", "Tokens served per MoE layer and local slot",
                                     labels=["layer", "slot"])
        for (layer, slot), tokens in sorted(self.tokens().items()):
            family.add_metric([str(layer), str(slot)], tokens)
        yield family
        yield CounterMetricFamily("epserve:expert_choices_dropped", "Choices of GPU batches, served without "
                                  "checks, that named a slot out of range or empty", value=self.dropped())


def export_expert_counters(tokens: Callable[[], dict[tuple[int, int], int]], dropped: Callable[[], int]) -> None:
    """Export ``tokens()`` ((MoE layer, local slot) -> tokens served since start) and ``dropped()`` (choices
    dropped unchecked since start) as counters (one expert shard per process)."""
    REGISTRY.register(_ExpertCounters(tokens, dropped))


def serve_metrics(host: str, port: int | None) -> int | None:
    """Serve ``/metrics`` on ``host:port`` (0: any free port) in a daemon thread; its port, None when off."""
    if port is None:
        return None
    server, _ = start_http_server(port, addr=host)
    return server.server_port
