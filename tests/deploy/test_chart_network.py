"""The chart's NetworkPolicies, rendered by the real Helm engine: who may open a connection to whom.

Each value set is rendered (tests/deploy/test_chart.py validates every manifest against the Kubernetes
schemas); here the policies are evaluated with Kubernetes' semantics (a pod no policy selects for a
direction is open in that direction; a selected one admits what some rule allows) over the release's
pods, a DNS server in kube-system and hosts outside the cluster.
"""
import ipaddress
from dataclasses import dataclass, field

import pytest

from tests.deploy.test_chart import SERVICES, Release, _selects, _value

pytestmark = pytest.mark.integration

NAMESPACE = "ml"


@dataclass(frozen=True)
class Peer:
    """One end of a connection: a pod (its labels, its namespace's name) or a host outside the cluster."""

    name: str
    labels: dict = field(default_factory=dict, hash=False)
    namespace: str | None = NAMESPACE
    ip: str = "10.1.0.1"


DNS = Peer("dns", {"k8s-app": "kube-dns"}, namespace="kube-system", ip="10.96.0.10")
CLIENT = Peer("client", namespace=None, ip="203.0.113.7")
EXTERNAL_REDIS = Peer("external-redis", namespace=None, ip="10.9.9.9")
ANYWHERE_ELSE = Peer("elsewhere", namespace=None, ip="198.51.100.1")


def _pods(release: Release) -> dict[str, Peer]:
    """component -> a pod of it."""
    workloads = release.of_kind("Deployment") + release.of_kind("StatefulSet")
    return {w.metadata.name.removeprefix("demo-epserve-"): Peer(w.metadata.name.removeprefix("demo-epserve-"),
                                                                  w.spec.template.metadata.labels)
            for w in workloads}


def _matches(rule_peer, peer: Peer) -> bool:
    """NetworkPolicyPeer semantics: an ipBlock, or pods by namespace and pod selectors."""
    if rule_peer.ip_block:
        block = rule_peer.ip_block
        address = ipaddress.ip_address(peer.ip)
        return (address in ipaddress.ip_network(block.cidr)
                and not any(address in ipaddress.ip_network(e) for e in block._except or []))
    if peer.namespace is None:
        return False
    if rule_peer.namespace_selector is not None:
        namespace_labels = {"kubernetes.io/metadata.name": peer.namespace}
        if not _selects(rule_peer.namespace_selector, namespace_labels):
            return False
    elif peer.namespace != NAMESPACE:
        return False
    return rule_peer.pod_selector is None or _selects(rule_peer.pod_selector, peer.labels)


def _allowed(release: Release, pod: Peer, direction: str, other: Peer, port: int, protocol: str) -> bool:
    """Whether ``pod``'s policies let it talk with ``other`` on ``port`` in ``direction``."""
    policies = [p for p in release.of_kind("NetworkPolicy") if pod.namespace == NAMESPACE
                and _selects(p.spec.pod_selector, pod.labels) and direction in p.spec.policy_types]
    if not policies:
        return True
    for policy in policies:
        for rule in (policy.spec.ingress if direction == "Ingress" else policy.spec.egress) or []:
            peers = rule.var_from if direction == "Ingress" else rule.to
            if rule.ports and not any(p.port == port and (p.protocol or "TCP") == protocol for p in rule.ports):
                continue
            if not peers or any(_matches(p, other) for p in peers):
                return True
    return False


def _connects(release: Release, source: Peer, target: Peer, port: int, protocol: str = "TCP") -> bool:
    return (_allowed(release, source, "Egress", target, port, protocol)
            and _allowed(release, target, "Ingress", source, port, protocol))


def _port(release: Release, component: str) -> int:
    return _value(release, f"{component}.port")


def test_each_component_reaches_only_the_next_one_and_redis(release):
    pods = _pods(release)
    redis = _value(release, "redis.enabled")
    assert set(pods) == set(SERVICES) | ({"redis"} if redis else set())
    reached = {(source, target) for source in pods for target in pods if source != target
               and _connects(release, pods[source], pods[target], _port(release, target))}
    expected = {("router", "attention"), ("attention", "expert")} | (
        {(c, "redis") for c in SERVICES} if redis else set())
    assert reached == expected
    for source in pods:                       # not even on another component's port
        for target in pods:
            for port in {_port(release, c) for c in pods} - {_port(release, target)}:
                assert not _connects(release, pods[source], pods[target], port), (source, target, port)


def test_services_resolve_names_and_reach_nothing_else_outside(release):
    pods = _pods(release)
    for component in SERVICES:
        pod = pods[component]
        assert _connects(release, pod, DNS, 53, "UDP") and _connects(release, pod, DNS, 53, "TCP")
        assert not _connects(release, pod, ANYWHERE_ELSE, 443) and not _connects(release, pod, ANYWHERE_ELSE, 53, "UDP")
        assert _connects(release, pod, EXTERNAL_REDIS, 6379) == (not _value(release, "redis.enabled"))
    if "redis" in pods:
        assert not any(_connects(release, pods["redis"], peer, port, protocol)
                       for peer, port, protocol in ((DNS, 53, "UDP"), (ANYWHERE_ELSE, 443, "TCP"),
                                                    (pods["router"], _port(release, "router"), "TCP")))


def test_clients_reach_the_routers_public_ports_only(release):
    pods = _pods(release)
    public = (_value(release, "router.port"), _value(release, "router.httpPort"))
    client_allowed = all(_connects(release, CLIENT, pods["router"], port) for port in public)
    assert client_allowed
    outsider = Peer("outsider", namespace=None, ip="192.0.2.1")
    assert all(_connects(release, outsider, pods["router"], port) for port in public) == (
        not _value(release, "networkPolicy.routerFrom"))
    for component in set(pods) - {"router"}:
        assert not _connects(release, CLIENT, pods[component], _port(release, component))


def test_metrics_ports_are_open_only_with_the_service_monitor(release):
    pods, port = _pods(release), _value(release, "serviceMonitor.port")
    prometheus = Peer("prometheus", {"app": "prometheus"}, namespace="monitoring", ip="10.1.9.9")
    for component in SERVICES:
        assert _allowed(release, pods[component], "Ingress", prometheus, port, "TCP") == _value(
            release, "serviceMonitor.enabled")
