"""The Helm chart (helm/epserve), rendered by the real Helm engine: helm-python-sdk bundles Helm's Go SDK.

There is no Kubernetes API server here, so the stand-in for a cluster is rendering plus schema
validation: every value set is linted and rendered; every manifest is validated against the
Kubernetes schemas (strict, at the chart's oldest supported version and a recent one) and loaded
into the `kubernetes` client's typed models. Container args are expanded the way the kubelet
expands ``$(VAR)`` (env from the rendered ConfigMap and Secret, the downward API of a sample pod)
and parsed by the real ``epserve`` command line, so the wiring is checked against flags that exist.
"""
import base64
import hashlib
import importlib.util
import json
import re
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from kubernetes.client import ApiClient

from epserve.services.cli import build_parser
from epserve.services.config import SERVICE_CONFIGS
from epserve.services.flags import flag_name, from_args, scalar_type, settings
from epserve.services.cluster.state import read_load_profile
from epserve.services.router.auth import read_api_keys

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "epserve"
DASHBOARD = CHART / "dashboards" / "epserve.json"
KUBE_VERSIONS = ("1.28.0", "1.33.0")          # the chart's kubeVersion floor, and a recent release
CRD_KINDS = {"ServiceMonitor"}                # not in the Kubernetes schemas
POD_IP, ORDINAL = "10.1.2.3", 3
VALUE_SETS = {
    "default": {},
    "cpu": yaml.safe_load((CHART / "ci" / "cpu-values.yaml").read_text()),
    "external-redis-secret": yaml.safe_load((CHART / "ci" / "external-redis-values.yaml").read_text()),
    "external-redis-url": {"redis": {"enabled": False}, "externalRedis": {"url": "redis://:s3cret@redis.db.svc:6379/2"}},
    "deepseek-v3": yaml.safe_load((CHART / "ci" / "deepseek-v3-values.yaml").read_text()),
    "tls": yaml.safe_load((CHART / "ci" / "tls-values.yaml").read_text()),
    "internal-tls-secrets": yaml.safe_load((CHART / "ci" / "internal-tls-values.yaml").read_text()),
    "internal-plaintext": {"internalTls": {"enabled": False}},
}
SERVICES = ("router", "attention", "expert")


@dataclass
class Release:
    """One rendering: the raw manifests, their typed models and the NOTES."""

    values: dict
    manifests: list[dict]
    notes: str
    objects: dict[tuple[str, str], object] = field(default_factory=dict)   # (kind, name) -> typed model

    def get(self, kind: str, suffix: str):
        return self.objects[(kind, f"demo-epserve{suffix}")]

    def workload(self, component: str):
        kind = "Deployment" if component == "router" else "StatefulSet"
        return self.get(kind, f"-{component}")

    def container(self, component: str):
        return self.workload(component).spec.template.spec.containers[0]

    def of_kind(self, kind: str) -> list:
        return [o for (k, _), o in self.objects.items() if k == kind]

    def config(self) -> dict[str, str]:
        return self.get("ConfigMap", "").data

    def secret(self, name: str) -> dict[str, str]:
        return {k: base64.b64decode(v).decode() for k, v in self.objects[("Secret", name)].data.items()}

    def pod_fields(self, component: str) -> dict[str, str]:
        """The downward API of a sample pod: ordinal ORDINAL of a StatefulSet."""
        name = f"demo-epserve-{component}-{ORDINAL}" if component != "router" else "demo-epserve-router-5d9c-x7k2p"
        return {"metadata.name": name, "status.podIP": POD_IP,
                "metadata.labels['apps.kubernetes.io/pod-index']": str(ORDINAL)}

    def env(self, component: str, container=None) -> dict[str, str]:
        """The container's environment as the kubelet builds it (Secrets not rendered here stay symbolic)."""
        container = container or self.container(component)
        env: dict[str, str] = {}
        for var in container.env or []:
            source = var.value_from
            if source is None:
                env[var.name] = _expand(var.value, env)
            elif source.field_ref:
                env[var.name] = self.pod_fields(component)[source.field_ref.field_path]
            elif source.config_map_key_ref:
                ref = source.config_map_key_ref
                env[var.name] = self.objects[("ConfigMap", ref.name)].data[ref.key]
            else:
                ref = source.secret_key_ref
                rendered = ("Secret", ref.name) in self.objects
                env[var.name] = self.secret(ref.name)[ref.key] if rendered else f"<secret {ref.name}/{ref.key}>"
        return env

    def cli(self, component: str) -> Namespace:
        """The container's command line, expanded and parsed by `epserve` (the image's ENTRYPOINT)."""
        container = self.container(component)
        assert container.command is None                      # the image's ENTRYPOINT ["epserve"] runs
        env = self.env(component)
        return build_parser().parse_args([_expand(arg, env) for arg in container.args])


    def file(self, component: str, path: str, container=None) -> str:
        """The text of the file at ``path`` in the component's container: an item of a Secret volume."""
        container = container or self.container(component)
        pod = self.workload(component).spec.template.spec
        for mount in container.volume_mounts or []:
            if path.startswith(mount.mount_path + "/"):
                volume = next(v for v in pod.volumes if v.name == mount.name)
                item = next(i for i in volume.secret.items if i.path == path[len(mount.mount_path) + 1:])
                return self.secret(volume.secret.secret_name)[item.key]
        raise AssertionError(f"{path} is on no Secret volume of {component}")

    def service_config(self, component: str):
        """The service's config dataclass, built from its parsed command line."""
        return from_args(SERVICE_CONFIGS[component], self.cli(component))


def _expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def _typed(manifest: dict):
    group_version = manifest["apiVersion"].split("/")[-1]
    model = f"{group_version.capitalize()}{manifest['kind']}"
    return ApiClient().deserialize(json.dumps(manifest), model, "application/json")


def render(chart, values: dict) -> Release:
    files = chart.render(values, name="demo", namespace="ml", is_install=True)
    manifests = [doc for path, text in sorted(files.items()) if not path.endswith("NOTES.txt")
                 for doc in yaml.safe_load_all(text) if doc]
    release = Release(values, manifests, files["epserve/templates/NOTES.txt"])
    for manifest in manifests:
        key = (manifest["kind"], manifest["metadata"]["name"])
        assert key not in release.objects, f"{key} rendered twice"
        release.objects[key] = manifest if manifest["kind"] in CRD_KINDS else _typed(manifest)
    return release


def _value(release: Release, path: str):
    """A value as the chart sees it: the value set's, else the default from values.yaml."""
    node, default = release.values, yaml.safe_load((CHART / "values.yaml").read_text())
    for key in path.split("."):
        node, default = (node or {}).get(key), default[key]
    return default if node is None else node


def _selects(selector, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    if any(labels.get(k) != v for k, v in (selector.match_labels or {}).items()):
        return False
    for expr in selector.match_expressions or []:
        present, value = expr.key in labels, labels.get(expr.key)
        ok = {"In": present and value in expr.values, "NotIn": value not in (expr.values or []),
              "Exists": present, "DoesNotExist": not present}[expr.operator]
        if not ok:
            return False
    return True


# ---- every value set ---------------------------------------------------------------------------
@pytest.mark.parametrize("values", list(VALUE_SETS.values()), ids=list(VALUE_SETS))
def test_helm_lint_is_clean(values):
    for kube_version in KUBE_VERSIONS:
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{kube_version}")
        assert report["errors"] == [], report
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_every_manifest_is_valid_for_kubernetes(release):
    kinds = set()
    for manifest in release.manifests:
        kinds.add(manifest["kind"])
        if manifest["kind"] in CRD_KINDS:
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(manifest, version, strict=True)
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "NetworkPolicy"} <= kinds


def test_replica_counts_equal_the_values(release):
    router = release.workload("router")
    if _value(release, "router.autoscaling.enabled"):
        hpa = release.get("HorizontalPodAutoscaler", "-router")
        assert router.spec.replicas is None and hpa.spec.scale_target_ref.name == router.metadata.name
        assert hpa.spec.min_replicas == _value(release, "router.autoscaling.minReplicas")
    else:
        assert router.spec.replicas == _value(release, "router.replicas")
    assert release.workload("attention").spec.replicas == _value(release, "attention.replicas")
    assert release.workload("expert").spec.replicas == _value(release, "expert.replicas")
    assert {s.spec.pod_management_policy for s in (release.workload("attention"), release.workload("expert"))} == {
        "Parallel"}


def test_gpu_limits_and_device_follow_the_values(release):
    assert "nvidia.com/gpu" not in (release.container("router").resources.limits or {})
    for component in ("attention", "expert"):
        gpus = _value(release, f"{component}.gpus")
        resources = release.container(component).resources
        if gpus:
            assert resources.limits["nvidia.com/gpu"] == str(gpus) == resources.requests["nvidia.com/gpu"]
            assert release.cli(component).device == "cuda"
        else:
            assert "nvidia.com/gpu" not in resources.limits and release.cli(component).device == "cpu"


def test_services_bind_every_address_advertise_the_pod_ip_and_are_probed_on_their_port(release):
    """Kubelet's gRPC probes speak plaintext only: a TLS router gets TCP probes; under mutual TLS, attention
    replicas and shards are probed on their plaintext health-only port."""
    tls, internal_tls = _value(release, "tls.enabled"), _value(release, "internalTls.enabled")
    for component in SERVICES:
        args, container = release.cli(component), release.container(component)
        assert (args.command, args.service, args.host, args.advertise_host) == ("serve", component, "0.0.0.0", POD_IP)
        (port,) = [p.container_port for p in container.ports if p.name == "grpc"]
        assert args.port == port == _value(release, f"{component}.port")
        health_ports = [p.container_port for p in container.ports if p.name == "health"]
        if component != "router" and internal_tls:
            assert health_ports == [args.health_port] == [_value(release, "internalTls.healthPort")]
        else:
            assert health_ports == [] and args.health_port is None
        for probe in (container.startup_probe, container.readiness_probe, container.liveness_probe):
            if component == "router" and tls:
                assert probe.grpc is None and probe.tcp_socket.port == port
            else:
                assert probe.grpc.port == (health_ports or [port])[0] and probe.grpc.service == ""
        service = release.get("Service", f"-{component}")
        assert _selects_pod(service.spec.selector, release.workload(component))
        assert [p.target_port for p in service.spec.ports if p.name == "grpc"] == ["grpc"]


def _selects_pod(selector: dict, workload) -> bool:
    labels = workload.spec.template.metadata.labels
    return all(labels.get(k) == v for k, v in selector.items())


def test_every_service_finds_redis_and_the_same_cluster(release):
    """The Redis URL comes from the environment (never a flag); with the built-in Redis it names the
    component's ACL user, whose password is a file from the Secret."""
    clusters = {release.cli(c).cluster for c in SERVICES}
    assert clusters == {release.config()["cluster"]}
    for component in SERVICES:
        args, url = release.cli(component), release.env(component)["EPSERVE_REDIS_URL"]
        assert args.redis is None
        if _value(release, "redis.enabled"):
            assert url == f"redis://{component}@demo-epserve-redis:6379/0"
            assert release.file(component, args.redis_password_file) == release.secret("demo-epserve")[
                f"redis-password-{component}"]
        elif _value(release, "externalRedis.existingSecret"):
            assert url == "<secret epserve-redis/url>" and args.redis_password_file is None
        else:
            assert url == _value(release, "externalRedis.url") and args.redis_password_file is None
        (init,) = release.workload(component).spec.template.spec.init_containers   # it waits for Redis
        assert release.env(component, init)["EPSERVE_REDIS_URL"] == url and "$EPSERVE_REDIS_URL" in init.command[-1]
        if _value(release, "redis.enabled"):
            assert release.env(component, init)["REDISCLI_AUTH"] == release.file(component, args.redis_password_file)
    if _value(release, "redis.enabled"):
        assert release.get("Service", "-redis").spec.ports[0].port == 6379


def test_attention_and_shards_agree_on_the_placement_and_the_model(release):
    attention, expert, router = release.cli("attention"), release.cli("expert"), release.cli("router")
    assert attention.expert_shards == expert.expert_shards == release.workload("expert").spec.replicas
    assert attention.redundant_experts == expert.redundant_experts == _value(release, "placement.redundantExperts")
    assert attention.model == expert.model == router.model == _value(release, "model.name")
    assert attention.replica_id == f"demo-epserve-attention-{ORDINAL}"


def test_each_shard_takes_its_id_from_its_pod_ordinal(release):
    (shard_id,) = [v for v in release.container("expert").env if v.name == "EPSERVE_SHARD_ID"]
    assert shard_id.value_from.field_ref.field_path == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert release.cli("expert").shard_id == ORDINAL


def test_shards_are_spread_across_nodes(release):
    expert = release.workload("expert")
    anti = expert.spec.template.spec.affinity.pod_anti_affinity
    (preferred,) = anti.preferred_during_scheduling_ignored_during_execution
    term = preferred.pod_affinity_term
    assert term.topology_key == "kubernetes.io/hostname"
    assert _selects(term.label_selector, expert.spec.template.metadata.labels)


def test_no_container_runs_as_root(release):
    workloads = release.of_kind("Deployment") + release.of_kind("StatefulSet")
    assert workloads
    for workload in workloads:
        pod = workload.spec.template.spec
        assert pod.security_context.run_as_non_root and pod.automount_service_account_token is False
        for container in (pod.init_containers or []) + pod.containers:
            context = container.security_context
            user = context.run_as_user if context.run_as_user is not None else pod.security_context.run_as_user
            assert user and user > 0, (workload.metadata.name, container.name)
            assert context.allow_privilege_escalation is False and context.capabilities.drop == ["ALL"]
            assert context.read_only_root_filesystem is True
            assert not context.privileged


def test_metrics_are_served_scraped_and_charted(release):
    """With the ServiceMonitor on, every service gets --metrics-port and a metrics port its Service names;
    with the dashboard on, its ConfigMap carries the sidecar label and the dashboard's JSON."""
    if not _value(release, "serviceMonitor.enabled"):
        assert not release.of_kind("ServiceMonitor") and ("ConfigMap", "demo-epserve-dashboard") not in release.objects
        return
    port = _value(release, "serviceMonitor.port")
    for pod in release.of_kind("Deployment") + release.of_kind("StatefulSet"):
        if pod.metadata.name.endswith("-redis"):
            continue
        (container,) = [c for c in pod.spec.template.spec.containers]
        assert f"--metrics-port={port}" in container.args and ("metrics", port) in {
            (p.name, p.container_port) for p in container.ports}
    (monitor,) = release.of_kind("ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    if not _value(release, "grafanaDashboard.enabled"):
        return
    dashboard = release.get("ConfigMap", "-dashboard")
    assert dashboard.metadata.labels["grafana_dashboard"] == "1"
    assert json.loads(dashboard.data["epserve.json"]) == json.loads(DASHBOARD.read_text())


def test_the_router_serves_the_openai_api_on_its_http_port(release):
    (router,) = _pod(release, "demo-epserve-router").containers
    http_port = _value(release, "router.httpPort")
    assert f"--http-port={http_port}" in router.args
    assert {(p.name, p.container_port) for p in router.ports} >= {("http", http_port)}
    service = release.get("Service", "-router")
    assert {(p.name, p.port, p.target_port) for p in service.spec.ports} >= {
        ("http", _value(release, "router.service.httpPort"), "http")}


def _pod(release: Release, name: str):
    return next(o for o in release.of_kind("Deployment") + release.of_kind("StatefulSet")
                if o.metadata.name == name).spec.template.spec


def test_notes_say_how_to_call_the_endpoint(release):
    assert "port-forward svc/demo-epserve-router" in release.notes or "LoadBalancer" in release.notes
    assert "epserve.v1.GenerationService/Generate" in release.notes
    if not (_value(release, "tls.enabled") or _value(release, "auth.apiKeys")):
        assert "epserve generate --endpoint 127.0.0.1:50051" in release.notes


# ---- particular value sets ---------------------------------------------------------------------
def test_default_attention_has_shm_and_both_services_tolerate_gpu_taints(chart):
    release = render(chart, {})
    pod = release.workload("attention").spec.template.spec
    (shm,) = [v for v in pod.volumes if v.name == "shm"]
    assert shm.empty_dir.medium == "Memory"
    assert any(m.mount_path == "/dev/shm" and m.name == "shm" for m in pod.containers[0].volume_mounts)
    for component in ("attention", "expert"):
        tolerations = release.workload(component).spec.template.spec.tolerations
        assert [(t.key, t.operator) for t in tolerations] == [("nvidia.com/gpu", "Exists")]


def test_cpu_only_requests_no_gpu_anywhere(chart):
    release = render(chart, VALUE_SETS["cpu"])
    text = json.dumps(release.manifests)
    assert "nvidia.com/gpu" not in text
    assert release.cli("expert").dtype == "float32" and release.cli("attention").model == "tiny"


def test_eight_shards_with_redundant_experts_and_the_checkpoint_on_a_claim(chart):
    release = render(chart, VALUE_SETS["deepseek-v3"])
    assert release.workload("expert").spec.replicas == 8 and release.cli("attention").expert_shards == 8
    assert release.cli("expert").redundant_experts == 32 and release.cli("attention").wire_dtype == "fp8"
    for component in SERVICES:
        pod = release.workload(component).spec.template.spec
        (model,) = [v for v in pod.volumes if v.name == "model"]
        assert model.persistent_volume_claim.claim_name == "deepseek-v3" and model.persistent_volume_claim.read_only
        (mount,) = [m for m in pod.containers[0].volume_mounts if m.name == "model"]
        assert mount.mount_path == "/models" and mount.read_only
        assert release.cli(component).model == "/models/DeepSeek-V3"


def test_hostpath_checkpoint_and_load_profile(chart, tmp_path):
    profile = json.dumps({"moe_layers": {"1": [5, 1, 1, 1]}})
    release = render(chart, {"model": {"name": "/models/m", "hostPath": {"path": "/data/m"}},
                             "placement": {"loadProfile": profile}})
    for component in ("attention", "expert"):
        pod = release.workload(component).spec.template.spec
        (model,) = [v for v in pod.volumes if v.name == "model"]
        assert model.host_path.path == "/data/m"
        (config,) = [v for v in pod.volumes if v.name == "config"]
        mount = next(m for m in pod.containers[0].volume_mounts if m.name == "config")
        assert f"{mount.mount_path}/{config.config_map.items[0].path}" == release.cli(component).load_profile
    (tmp_path / "profile.json").write_text(release.config()["load-profile.json"])
    assert read_load_profile(tmp_path / "profile.json", [1], 4).tolist() == [[5, 1, 1, 1]]


def test_tls_and_api_keys_reach_the_router(chart, tmp_path):
    release = render(chart, VALUE_SETS["tls"])
    args, pod = release.cli("router"), release.workload("router").spec.template.spec
    mounts = {m.name: m.mount_path for m in pod.containers[0].volume_mounts}
    volumes = {v.name: v for v in pod.volumes}
    assert volumes["tls"].secret.secret_name == "epserve-tls"
    assert (args.tls_cert, args.tls_key) == (f"{mounts['tls']}/tls.crt", f"{mounts['tls']}/tls.key")
    (item,) = volumes["api-keys"].secret.items
    assert args.api_keys_file == f"{mounts['api-keys']}/{item.path}"
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(release.secret(volumes["api-keys"].secret.secret_name)[item.key])
    assert read_api_keys(keys_file) == ["key-of-team-a", "key-of-team-b"]
    assert release.get("Service", "-router").spec.type == "LoadBalancer"
    assert "Bearer YOUR-KEY" in release.notes and "-cacert" in release.notes
    monitor = release.objects[("ServiceMonitor", "demo-epserve")]
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


def test_builtin_redis_keeps_an_append_only_file_behind_acl_users(chart):
    release = render(chart, {"redis": {"password": "fixed-pass"}})
    redis = release.workload("redis")
    container = redis.spec.template.spec.containers[0]
    args = " ".join(container.args)
    assert "--appendonly yes" in args and "--appendfsync everysec" in args and "--dir /data" in args
    assert "--maxmemory 3gb --maxmemory-policy volatile-lru" in args     # ended requests go before live ones
    assert "--requirepass" not in args
    (acl_file,) = [a for a, flag in zip(container.args[1:], container.args) if flag == "--aclfile"]
    assert release.file("redis", acl_file).startswith("user default off\n")
    assert "user admin on #" + hashlib.sha256(b"fixed-pass").hexdigest() in release.file("redis", acl_file)
    assert release.env("redis", container)["REDISCLI_AUTH"] == "fixed-pass"       # the probes log in as admin
    assert all("--user admin" in " ".join(p._exec.command) for p in (container.readiness_probe, container.liveness_probe))
    assert [t.metadata.name for t in redis.spec.volume_claim_templates] == ["data"]


def test_external_redis_renders_no_redis(chart):
    for name in ("external-redis-secret", "external-redis-url"):
        release = render(chart, VALUE_SETS[name])
        assert not [o for o in release.of_kind("StatefulSet") if o.metadata.name.endswith("-redis")]
        assert ("Service", "demo-epserve-redis") not in release.objects


@pytest.mark.parametrize("values,message", [
    ({"redis": {"enabled": False}}, "externalRedis"),
    ({"tls": {"enabled": True}}, "secretName"),
    ({"expert": {"replica": 8}}, "replica"),
    ({"attention": {"gpus": -1}}, "gpus"),
    ({"redis": {"password": "p@ss/word"}}, "password"),
    ({"model": {"persistentVolumeClaim": {"claimName": "a"}, "hostPath": {"path": "/m"}}}, "model"),
    ({"internalTls": {"existingSecrets": {"router": "r", "attention": "a"}}}, "existingSecrets"),
], ids=["redis-nowhere", "tls-without-secret", "typo", "negative-gpus", "password-not-url-safe", "two-checkpoints",
        "internal-tls-secret-missing"])
def test_values_schema_rejects_bad_values(chart, values, message):
    with pytest.raises(helm.HelmValuesError, match=message):
        chart.render(values, name="demo", namespace="ml")


def test_the_image_runs_epserve_as_the_charts_user_with_home_on_the_cache_volume(chart):
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["epserve"]' in dockerfile
    (user,) = re.findall(r"^USER (\d+)", dockerfile, re.M)
    assert int(user) == _value(render(chart, {}), "podSecurityContext.runAsUser")
    assert "ENV HOME=/cache" in dockerfile
    ignored = {line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"}
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M):
        for path in source.split():
            assert (ROOT / path).exists() and path not in ignored, path


# ---- settings: values that become flags are config fields ------------------------------------------
def _gen_helm_schema():
    spec = importlib.util.spec_from_file_location("gen_helm_schema", ROOT / "scripts" / "gen_helm_schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_settings_schema_is_generated_from_the_service_configs():
    assert (CHART / "values.schema.json").read_text() == _gen_helm_schema().generate(), \
        "run `python scripts/gen_helm_schema.py` and commit helm/epserve/values.schema.json"


FORMATTED_VALUES = {"capacity": "0.5"}          # string settings with a format of their own


def _other_value(cls, f):
    """A value of setting ``f`` that is not its default and is within its choices and bounds."""
    kind, meta = scalar_type(cls, f.name), f.metadata
    if kind is bool:
        return not f.default
    if meta["choices"]:
        return next(c for c in meta["choices"] if c != f.default)
    if kind is str:
        return FORMATTED_VALUES.get(f.name, f"{f.name}-value")
    value = (meta["low"] if meta["low"] is not None else 0) + (1 if kind is int else 0.5)
    return value + 1 if value == f.default else value


@pytest.mark.parametrize("component", SERVICES)
def test_every_setting_value_becomes_its_flag_and_parses_into_the_config(chart, component):
    gen = _gen_helm_schema()
    cls = SERVICE_CONFIGS[component]
    wanted = {f.name: _other_value(cls, f) for f in settings(cls) if f.name not in gen.CHART_SET}
    assert wanted, f"{component} has no settings"
    release = render(chart, {component: {"settings": {gen.camel(name): v for name, v in wanted.items()}}})
    config = release.service_config(component)
    assert {name: getattr(config, name) for name in wanted} == wanted
    flags = {arg.split("=")[0] for arg in release.container(component).args if arg.startswith("--")}
    known = {flag_name(f.name) for f in settings(cls)} | {"--no-" + flag_name(f.name)[2:] for f in settings(cls)}
    assert flags <= known, f"flags that are no {cls.__name__} setting: {flags - known}"


def test_every_rendered_command_line_builds_its_service_config(release):
    for component in SERVICES:
        assert isinstance(release.service_config(component), SERVICE_CONFIGS[component])
    grace = release.workload("attention").spec.template.spec.termination_grace_period_seconds
    assert grace > release.service_config("attention").drain_timeout       # running requests can finish


def test_a_misspelt_or_out_of_range_setting_is_refused(chart):
    with pytest.raises(helm.HelmValuesError, match="microBatchs"):
        chart.render({"attention": {"settings": {"microBatchs": 2}}}, name="demo", namespace="ml")
    with pytest.raises(helm.HelmValuesError, match="microBatches"):
        chart.render({"attention": {"settings": {"microBatches": 9}}}, name="demo", namespace="ml")
