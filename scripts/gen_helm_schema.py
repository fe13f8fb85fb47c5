"""Regenerate the ``settings`` of each service in helm/epserve/values.schema.json from the service configs.

    python scripts/gen_helm_schema.py

``router.settings``, ``attention.settings`` and ``expert.settings`` in the chart's values take any
setting of that service's config (``epserve.services.config``) by its camelCase name; the templates
render them as ``--kebab-case=value`` flags. The settings the chart sets itself from other values
(``CHART_SET``: addresses, ids, Redis, the model, placement, auth, TLS) are not among them. Types,
bounds, choices, defaults and descriptions come from the dataclass fields, so the schema cannot
drift from the flags; tests/deploy/test_chart.py fails when the committed file is stale.
"""
from __future__ import annotations

import json
from pathlib import Path

from epserve.services.config import SERVICE_CONFIGS
from epserve.services.flags import scalar_type, settings

SCHEMA = Path(__file__).resolve().parent.parent / "helm" / "epserve" / "values.schema.json"
CHART_SET = {  # config field -> the chart values (or pod facts) it comes from
    "redis": "redis.* / externalRedis.*", "redis_password_file": "redis.* (a Secret volume)", "cluster": "cluster", "model": "model.name", "host": "0.0.0.0",
    "port": "<service>.port", "advertise_host": "the pod IP", "device": "<service>.gpus", "dtype": "model.dtype",
    "expert_shards": "expert.replicas", "redundant_experts": "placement.redundantExperts",
    "load_profile": "placement.loadProfile", "router_id": "the pod name", "replica_id": "the pod name",
    "shard_id": "the pod ordinal", "http_port": "router.httpPort", "metrics_port": "serviceMonitor.port", "api_keys_file": "auth.*", "tls_cert": "tls.*", "tls_key": "tls.*",
    "cluster_ca": "internalTls.*", "cluster_cert": "internalTls.*", "cluster_key": "internalTls.*",
    "health_port": "internalTls.healthPort",
}
JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean"}


def camel(name: str) -> str:
    """``micro_batch_min_tokens`` -> ``microBatchMinTokens`` (Helm's ``kebabcase`` turns it into the flag)."""
    first, *rest = name.split("_")
    return first + "".join(word.capitalize() for word in rest)


def settings_schema(kind: str) -> dict:
    """The JSON schema of ``<kind>.settings``."""
    cls, properties = SERVICE_CONFIGS[kind], {}
    for f in settings(cls):
        if f.name in CHART_SET:
            continue
        meta = f.metadata
        prop = {"type": JSON_TYPES[scalar_type(cls, f.name)], "description": meta["help"]}
        if f.default is not None:
            prop["default"] = f.default
        if meta["choices"]:
            prop["enum"] = list(meta["choices"])
        if meta["low"] is not None:
            prop["minimum"] = meta["low"]
        if meta["high"] is not None:
            prop["maximum"] = meta["high"]
        properties[camel(f.name)] = prop
    return {"type": "object", "additionalProperties": False,
            "description": f"settings of `epserve serve {kind}` by camelCase name (unset: the service's default)",
            "properties": properties}


def generate() -> str:
    """The schema file's text with every service's ``settings`` regenerated."""
    schema = json.loads(SCHEMA.read_text())
    for kind in SERVICE_CONFIGS:
        schema["properties"][kind]["properties"]["settings"] = settings_schema(kind)
    return json.dumps(schema, indent=2) + "\n"


if __name__ == "__main__":
    SCHEMA.write_text(generate())
    print(SCHEMA)
