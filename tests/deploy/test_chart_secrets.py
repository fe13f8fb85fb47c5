"""The chart's secrets, rendered by the real Helm engine: no Secret reaches a command line; the built-in
Redis's ACL file, loaded by a real redis-server, admits each component's user to its cluster's keys
only, and nobody without a password; the internal plane's certificates, loaded by a real gRPC server,
make mutual TLS that admits the right kind of caller only."""
import hashlib
import json
import subprocess

import grpc
import pytest
import redis
from cryptography import x509

from epserve.services.cluster import cluster_tls, redis_acl
from epserve.services.cluster.cluster_tls import ClusterTls
from epserve.services.cluster.grpc_server import start_grpc_server
from epserve.services.cluster.ports import free_port
from epserve.services.cluster.keys import SERVICE_KINDS, Keys
from epserve.services.cluster.redis_server import find_redis_server
from tests.deploy.test_chart import SERVICES, Release, _value, render
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


def _secret_env(container) -> set[str]:
    return {v.name for v in container.env or [] if v.value_from and v.value_from.secret_key_ref}


def test_no_secret_reaches_a_command_line(release):
    """The kubelet expands $(VAR) in command and args into the process list: no such VAR is a Secret's."""
    workloads = release.of_kind("Deployment") + release.of_kind("StatefulSet")
    for workload in workloads:
        pod = workload.spec.template.spec
        for container in (pod.init_containers or []) + pod.containers:
            line = " ".join((container.command or []) + (container.args or []))
            assert not [name for name in _secret_env(container) if f"$({name})" in line], (
                workload.metadata.name, container.name, line)
    secret_values = [v for name, o in release.objects.items() if name[0] == "Secret"
                     for v in release.secret(name[1]).values()]
    rendered_args = " ".join(" ".join(c.args or []) for w in workloads for c in w.spec.template.spec.containers)
    assert not [v for v in secret_values if v.strip() and v.strip() in rendered_args]


def test_the_rendered_acl_file_admits_each_component_to_its_cluster_only(chart, tmp_path):
    release = render(chart, {})
    secret = release.secret("demo-epserve")
    passwords = {user: secret["redis-password" + ("" if user == redis_acl.ADMIN_USER else f"-{user}")]
                 for user in redis_acl.USERS}
    keys = Keys(release.config()["cluster"])
    assert secret["users.acl"] == redis_acl.acl_file(passwords, keys)       # the same rules as `epserve up`'s
    (tmp_path / "users.acl").write_text(secret["users.acl"])
    port = free_port()
    server = subprocess.Popen([find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--aclfile", str(tmp_path / "users.acl")],
                              cwd=tmp_path, stdout=subprocess.DEVNULL)
    try:
        admin = redis.Redis(port=port, username="admin", password=passwords["admin"])
        wait_until(lambda: _answers(admin), 10, "redis-server answers")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).get(keys.placement_current)
        for kind in SERVICE_KINDS:
            client = redis.Redis(port=port, username=kind, password=passwords[kind])
            client.set(keys.placement_current, 1)
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.set(Keys("another").placement_current, 1)
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.flushall()
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.scan()                                   # would list other clusters' keys
            with pytest.raises(redis.AuthenticationError):
                redis.Redis(port=port, username=kind, password=passwords["admin"]).ping()
    finally:
        server.terminate()
        server.wait(timeout=10)


def _answers(client: redis.Redis) -> bool:
    try:
        return client.ping()
    except redis.ConnectionError:
        return False


def _cluster_tls(release: Release, component: str) -> ClusterTls:
    args = release.cli(component)
    return ClusterTls(*(release.file(component, path).encode()
                        for path in (args.cluster_ca, args.cluster_cert, args.cluster_key)))


def test_every_service_gets_its_own_certificate_of_one_ca(release):
    if not _value(release, "internalTls.enabled"):
        assert all(release.cli(c).cluster_cert is None for c in SERVICES)
        assert ("Secret", "demo-epserve-internal-tls") not in release.objects
        return
    existing = _value(release, "internalTls.existingSecrets")
    for component in SERVICES:
        args = release.cli(component)
        pod = release.workload(component).spec.template.spec
        (volume,) = [v for v in pod.volumes if v.name == "internal-tls"]
        if existing:
            assert volume.secret.secret_name == existing[component]
            assert {i.key for i in volume.secret.items} == {"ca.crt", "tls.crt", "tls.key"}
            continue
        tls = _cluster_tls(release, component)
        cert, ca = x509.load_pem_x509_certificate(tls.cert), x509.load_pem_x509_certificate(tls.ca)
        cert.verify_directly_issued_by(ca)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == [cluster_tls.identity(component)]
        assert args.cluster_key.endswith("tls.key") and b"PRIVATE KEY" in tls.key


def test_the_charts_certificates_make_mutual_tls_between_the_right_kinds(chart):
    """A real expert-shard server with the rendered expert certificate: the rendered attention certificate
    may dispatch, the router's may not, a caller without one fails the handshake."""
    release = render(chart, {})
    server = start_grpc_server(_register_echo, ["epserve.v1.ExpertService"],
                               **cluster_tls.server_security(_cluster_tls(release, "expert"), aio=False))
    address = f"127.0.0.1:{server.port}"
    try:
        with cluster_tls.channel(address, _cluster_tls(release, "attention"), "expert", []) as channel:
            assert channel.unary_unary(ECHO)(b"ping", timeout=10) == b"ping"
        with cluster_tls.channel(address, _cluster_tls(release, "router"), "expert", []) as channel, \
                pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(ECHO)(b"ping", timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(ECHO)(b"ping", timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=None)


ECHO = "/epserve.v1.ExpertService/GetShardInfo"


def _register_echo(server) -> None:
    handler = grpc.method_handlers_generic_handler(
        "epserve.v1.ExpertService", {"GetShardInfo": grpc.unary_unary_rpc_method_handler(lambda r, c: r)})
    server.add_generic_rpc_handlers((handler,))


def _go_json(data: dict[str, str]) -> str:
    """``data`` as Sprig's toJson writes it (Go's json.Marshal: sorted keys, compact, <, >, & escaped)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def test_the_pods_checksums_are_of_the_secrets_they_mount(chart):
    """Generated passwords and certificates are made once per render: each pod's checksum annotations hash
    exactly what the rendered Secrets hold (a second, different generation would roll every pod on the first
    upgrade)."""
    release = render(chart, {})
    secret = release.secret("demo-epserve")                                   # decoded: raw values
    tls = release.objects[("Secret", "demo-epserve-internal-tls")].data       # base64, as generated
    want = {"checksum/secret": hashlib.sha256(_go_json(secret).encode()).hexdigest(),
            "checksum/internal-tls": hashlib.sha256(_go_json(tls).encode()).hexdigest()}
    for component in SERVICES:
        annotations = release.workload(component).spec.template.metadata.annotations
        assert {key: annotations[key] for key in want} == want, component
    redis_pods = release.get("StatefulSet", "-redis").spec.template.metadata.annotations
    assert redis_pods["checksum/secret"] == want["checksum/secret"]
