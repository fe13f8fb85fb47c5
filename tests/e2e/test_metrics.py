"""Every service of `epserve up` serves Prometheus metrics; they move as requests run; the chart's Grafana
dashboard queries only names they export."""
from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
from epserve_client import Client
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_cluster import UpCluster

pytestmark = pytest.mark.e2e
DASHBOARD = Path(__file__).resolve().parents[2] / "helm" / "epserve" / "dashboards" / "epserve.json"


@pytest.fixture(scope="module")
def up():
    cluster = UpCluster("tiny", attention=1, shards=2, redundant=2)
    yield cluster
    cluster.stop()


def scrape(address: str) -> dict[str, float]:
    """Sample name with sorted labels -> value, parsed with prometheus_client's own parser."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + json.dumps(sorted(sample.labels.items())) if sample.labels else sample.name
            samples[key] = sample.value
    return samples


def scrape_kind(up: UpCluster, kind: str) -> list[dict[str, float]]:
    return [scrape(service.info["metrics_address"]) for service in up.registry.live(kind)]


def total(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "["))


def test_metrics_move_as_requests_run(up):
    (router_before,) = scrape_kind(up, "router")
    shards_before = scrape_kind(up, "expert")
    with Client(up.endpoint) as client:
        for _ in range(3):
            client.generate([5, 6, 7, 8], max_tokens=10, temperature=0, ignore_eos=True)
    (router,) = scrape_kind(up, "router")
    assert total(router, "epserve:generation_tokens_total") - total(router_before, "epserve:generation_tokens_total") == 30
    assert total(router, "epserve:prompt_tokens_total") - total(router_before, "epserve:prompt_tokens_total") == 12
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                      "time_per_output_token_seconds"):
        name = f"epserve:{histogram}_count"
        assert total(router, name) - total(router_before, name) == 3, name
    assert router['epserve:request_success_total[["finished_reason", "length"]]'] >= 3
    assert router["epserve:num_requests_running"] == 0
    (attention,) = scrape_kind(up, "attention")
    assert attention["epserve:kv_cache_usage_perc"] == 0 and total(attention, "epserve:expert_dispatch_seconds_count") > 0
    shards = scrape_kind(up, "expert")
    served = sum(total(s, "epserve:expert_tokens_total") for s in shards) - sum(
        total(s, "epserve:expert_tokens_total") for s in shards_before)
    assert served > 0 and all(s["epserve:placement_version"] >= 1 for s in shards)


def test_every_dashboard_query_names_an_exported_metric(up):
    with Client(up.endpoint) as client:
        client.generate([5, 6, 7], max_tokens=4, temperature=0)
    exported = {re.sub(r"\[.*", "", key) for kind in ("router", "attention", "expert") for samples in scrape_kind(up, kind)
                for key in samples}
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"epserve:[a-z0-9_:]+", target["expr"])}
    assert len(queried) >= 15 and queried <= exported, queried - exported
