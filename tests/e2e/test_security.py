"""The internal plane of an `epserve up` cluster: attention replicas and expert shards refuse gRPC callers
without a certificate of the cluster's CA, and callers whose certificate names a kind not allowed for the
service; Redis admits only its ACL users; each component logs in as its own user with a password no
command line shows; and the cluster serves generations meanwhile."""
from __future__ import annotations

import os
import socket
import stat
import urllib.parse
from pathlib import Path

import grpc
import pytest
import redis
from epserve_client import Client

from epserve.services.cluster import cluster_tls
from epserve.services.cluster.cluster_ca import write_cluster_certificates
from epserve.services.cluster.cluster_tls import ClusterTls
from epserve.services.cluster.keys import SERVICE_KINDS
from epserve.services.proto import attention_pb2, attention_pb2_grpc, expert_pb2, expert_pb2_grpc
from epserve.services.up_state import read_up_state
from tests.e2e.test_cluster import UpCluster

pytestmark = pytest.mark.e2e
PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def up():
    cluster = UpCluster("tiny", attention=1, shards=1, redundant=0, transport="grpc")   # Dispatch over mutual TLS
    yield cluster
    cluster.stop()


def _descendants(pid: int) -> list[int]:
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(c) for c in f.read().split()]
    return children + [d for c in children for d in _descendants(c)]


def _command_line(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace")


def _redis_address(up: UpCluster) -> tuple[str, int]:
    url = urllib.parse.urlsplit(read_up_state(up.state_file)["redis_url"])
    return url.hostname, url.port


def _raw_reply(address: tuple[str, int], *commands: bytes) -> list[bytes]:
    """The first line of Redis's reply to each inline command, on one connection without a client library."""
    with socket.create_connection(address, timeout=10) as conn, conn.makefile("rb") as replies:
        answers = []
        for command in commands:
            conn.sendall(command + b"\r\n")
            answers.append(replies.readline().strip())
        return answers


def _password_files(up: UpCluster) -> dict[str, str]:
    """kind -> the --redis-password-file its services were started with."""
    files = {}
    for pid in _descendants(up.process.pid):
        line = _command_line(pid)
        for kind in SERVICE_KINDS:
            if f" serve {kind} " in line:
                (flag,) = [a for a in line.split() if a.startswith("--redis-password-file=")]
                files.setdefault(kind, flag.split("=", 1)[1])
                assert files[kind] == flag.split("=", 1)[1]
    return files


def test_redis_refuses_callers_without_credentials(up):
    address = _redis_address(up)
    assert _raw_reply(address, b"PING", b"GET anything")[0].startswith(b"-NOAUTH")
    (wrong,) = _raw_reply(address, b"AUTH router not-the-password")
    assert wrong.startswith(b"-WRONGPASS")
    (default_user,) = _raw_reply(address, b"AUTH default anything")
    assert default_user.startswith(b"-WRONGPASS")


def test_each_component_logs_in_as_its_own_user_and_the_cluster_serves(up):
    files = _password_files(up)
    assert set(files) == set(SERVICE_KINDS)
    for kind, path in files.items():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        client = redis.Redis(*_redis_address(up), username=kind, password=Path(path).read_text())
        assert client.exists(up.registry.keys.placement_current) == 1       # its cluster's keys
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.config_get("requirepass")                # no administrative command
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.get("epserve:another-cluster:placement:current")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.scan()                                   # key patterns do not filter SCAN
        client.close()
    assert {kind: len(up.registry.live(kind)) for kind in SERVICE_KINDS} == {"router": 1, "attention": 1, "expert": 1}
    with Client(up.endpoint, timeout=120) as client:
        assert len(client.generate(PROMPT, max_tokens=4, temperature=0, ignore_eos=True).token_ids) == 4


def test_no_password_is_on_any_command_line(up):
    passwords = {Path(path).read_text() for path in _password_files(up).values()}
    passwords.add(urllib.parse.urlsplit(read_up_state(up.state_file)["redis_url"]).password)
    assert len(passwords) == len(SERVICE_KINDS) + 1 and all(passwords)
    pids = [up.process.pid, *_descendants(up.process.pid)]
    assert len(pids) >= 1 + 1 + len(SERVICE_KINDS)                # up, redis-server, one of each service
    for pid in pids:
        line = _command_line(pid)
        assert not [p for p in passwords if p in line], f"a password on the command line of {pid}: {line}"
    assert stat.S_IMODE(os.stat(up.state_file).st_mode) == 0o600   # the state file holds the admin's


def _unary_call(channel: grpc.Channel, kind: str):
    if kind == "attention":
        return attention_pb2_grpc.AttentionServiceStub(channel).GetLoad(attention_pb2.LoadRequest(), timeout=10)
    return expert_pb2_grpc.ExpertServiceStub(channel).GetShardInfo(expert_pb2.ShardInfoRequest(), timeout=10)


def _stream_call(channel: grpc.Channel, kind: str) -> list:
    """The service's stream (Session, Dispatch), opened and closed without a message."""
    if kind == "attention":
        return list(attention_pb2_grpc.AttentionServiceStub(channel).Session(iter([]), timeout=10))
    return list(expert_pb2_grpc.ExpertServiceStub(channel).Dispatch(iter([]), timeout=10))


def _refusal(call, channel: grpc.Channel, kind: str) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as refused:
        call(channel, kind)
    return refused.value.code()


def _services(up: UpCluster):
    return [up.registry.live("attention")[0], up.registry.live("expert")[0]]


def _foreign_certificates(directory: Path) -> tuple[str, str, str]:
    """A certificate naming the admin identity, from a CA that is not the cluster's."""
    return write_cluster_certificates(str(directory), (cluster_tls.ADMIN,))[cluster_tls.ADMIN]


def test_replicas_and_shards_refuse_callers_without_a_cluster_certificate(up, tmp_path):
    foreign = ClusterTls.from_files(*_foreign_certificates(tmp_path))
    for service in _services(up):
        for call in (_unary_call, _stream_call):
            with grpc.insecure_channel(service.address) as plain:
                assert _refusal(call, plain, service.kind) == grpc.StatusCode.UNAVAILABLE
            with cluster_tls.channel(service.address, foreign, service.kind, []) as other_ca:
                assert _refusal(call, other_ca, service.kind) == grpc.StatusCode.UNAVAILABLE
        with up.internal_channel(service) as admin:                 # the cluster's own certificate is admitted
            assert _unary_call(admin, service.kind).ByteSize() >= 0
    with Client(up.endpoint, timeout=120) as client:                # and the cluster serves meanwhile
        assert len(client.generate(PROMPT, max_tokens=4, temperature=0, ignore_eos=True).token_ids) == 4
    assert [r.info["expert_transport"] for r in up.registry.live("attention")] == ["grpc"]


def test_each_internal_service_admits_only_the_kinds_that_call_it(up):
    """A certificate of the cluster's CA naming another kind is refused with PERMISSION_DENIED: an expert
    shard's may not drive an attention replica, a router's may not dispatch to a shard."""
    directory = Path(read_up_state(up.state_file)["admin_tls"]["cert"]).parent
    allowed = {"attention": "router", "expert": "attention"}
    for service in _services(up):
        for kind in SERVICE_KINDS:
            tls = ClusterTls.from_files(*(str(directory / name) for name in ("ca.crt", f"{kind}.crt", f"{kind}.key")))
            with cluster_tls.channel(service.address, tls, service.kind, []) as channel:
                if kind == allowed[service.kind]:
                    assert _unary_call(channel, service.kind).ByteSize() >= 0
                    continue
                for call in (_unary_call, _stream_call):
                    assert _refusal(call, channel, service.kind) == grpc.StatusCode.PERMISSION_DENIED, (
                        service.kind, kind, call.__name__)
