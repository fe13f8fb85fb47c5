"""Mutual TLS on real gRPC servers (sync and aio) with certificates from ``cluster_ca``: a caller needs a
certificate of the cluster's CA naming an allowed kind; the plaintext health-only port answers probes."""
from __future__ import annotations

import os
import stat

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epserve.services.cluster import cluster_tls
from epserve.services.cluster.cluster_ca import write_cluster_certificates
from epserve.services.cluster.cluster_tls import ClusterTls
from epserve.services.cluster.grpc_server import start_aio_grpc_server, start_grpc_server

pytestmark = pytest.mark.unit
KINDS = ("router", "attention", "expert", cluster_tls.ADMIN)
# an ExpertService stand-in: GetShardInfo's path, raw bytes in and out
METHOD = "/epserve.v1.ExpertService/GetShardInfo"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, ClusterTls]:
    directory = tmp_path_factory.mktemp("tls")
    paths = write_cluster_certificates(str(directory), KINDS)
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o600 for files in paths.values() for p in files)
    return {kind: ClusterTls.from_files(*files) for kind, files in paths.items()}


def _echo(request, context):
    return request


def _register_sync(server):
    handler = grpc.method_handlers_generic_handler(
        "epserve.v1.ExpertService", {"GetShardInfo": grpc.unary_unary_rpc_method_handler(_echo)})
    server.add_generic_rpc_handlers((handler,))


async def _echo_async(request, context):
    return request


def _register_aio(server):
    handler = grpc.method_handlers_generic_handler(
        "epserve.v1.ExpertService", {"GetShardInfo": grpc.unary_unary_rpc_method_handler(_echo_async)})
    server.add_generic_rpc_handlers((handler,))


@pytest.fixture(params=["sync", "aio"])
def server(request, certificates):
    start, register = ((start_grpc_server, _register_sync) if request.param == "sync"
                       else (start_aio_grpc_server, _register_aio))
    started = start(register, ["epserve.v1.ExpertService"], health_address="127.0.0.1:0",
                    **cluster_tls.server_security(certificates["expert"], aio=request.param == "aio"))
    yield started
    started.stop(grace=None)


def _call(channel) -> bytes:
    return channel.unary_unary(METHOD)(b"ping", timeout=10)


def _code(channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as refused:
        _call(channel)
    return refused.value.code()


def test_the_certificates_name_their_kind(certificates):
    for kind, tls in certificates.items():
        cert = x509.load_pem_x509_certificate(tls.cert)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == [cluster_tls.identity(kind)]


def test_only_allowed_kinds_of_the_cluster_may_call(server, certificates, tmp_path):
    address = f"127.0.0.1:{server.port}"
    with grpc.insecure_channel(address) as plain:
        assert _code(plain) == grpc.StatusCode.UNAVAILABLE
    foreign = ClusterTls.from_files(*write_cluster_certificates(str(tmp_path), ("attention",))["attention"])
    with cluster_tls.channel(address, foreign, "expert", []) as other_ca:
        assert _code(other_ca) == grpc.StatusCode.UNAVAILABLE
    for kind in KINDS:
        with cluster_tls.channel(address, certificates[kind], "expert", []) as channel:
            if kind in cluster_tls.ALLOWED_CALLERS["epserve.v1.ExpertService"]:
                assert _call(channel) == b"ping"
            else:
                assert _code(channel) == grpc.StatusCode.PERMISSION_DENIED


def test_a_service_no_rule_names_admits_the_admin_alone():
    assert cluster_tls._allowed("/epserve.v1.SomethingNew/Do") == (cluster_tls.ADMIN,)
    assert cluster_tls._allowed("/grpc.health.v1.Health/Check") is None          # any cluster certificate


def test_a_caller_checks_the_server_names_the_kind_it_dials(server, certificates):
    """An attention certificate's server is no expert shard: the router's channel to 'attention' refuses it."""
    with cluster_tls.channel(f"127.0.0.1:{server.port}", certificates["attention"], "attention", []) as channel:
        assert _code(channel) == grpc.StatusCode.UNAVAILABLE


def test_the_health_port_answers_probes_in_plaintext(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as not_there:              # nothing else is served there
            _call(channel)
        assert not_there.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as no_watch:                # no stream holds its threads
            next(health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10))
        assert no_watch.value.code() == grpc.StatusCode.UNIMPLEMENTED
        server.enter_graceful_shutdown()
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING


def test_some_but_not_all_files_is_an_error_naming_the_missing_flags(tmp_path):
    with pytest.raises(ValueError, match="--cluster-key: required with --cluster-ca, --cluster-cert"):
        ClusterTls.from_files("ca.crt", "expert.crt", None)
    with pytest.raises(ValueError, match="--cluster-ca: cannot read"):
        ClusterTls.from_files(str(tmp_path / "absent"), "b", "c")
    assert ClusterTls.from_files(None, None, None) is None
