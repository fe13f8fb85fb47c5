"""How a service finds and logs in to Redis: the URL from --redis or $EPSERVE_REDIS_URL, the password from
--redis-password-file, against a real Redis with ACL users (the default user off)."""
from __future__ import annotations

import pytest
import redis

from epserve.services.cluster.keys import Keys
from epserve.services.cluster.redis_server import EmbeddedRedis
from epserve.services.config import RouterConfig
from epserve.services.lifecycle import REDIS_URL_ENV, redis_of

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def acl_redis():
    with EmbeddedRedis(acl_keys=Keys("t")) as server:
        yield server


def test_the_url_from_the_environment_and_the_password_from_a_file(acl_redis, monkeypatch):
    monkeypatch.setenv(REDIS_URL_ENV, acl_redis.user_url("router"))
    client = redis_of(RouterConfig(redis_password_file=acl_redis.password_file("router")))
    assert client.set(Keys("t").placement_current, 1) and client.get(Keys("t").placement_current) == b"1"
    with pytest.raises(redis.AuthenticationError):                # the same URL without the password
        redis_of(RouterConfig()).ping()


def test_the_flag_wins_over_the_environment(acl_redis, monkeypatch):
    monkeypatch.setenv(REDIS_URL_ENV, "redis://router@127.0.0.1:1/0")
    config = RouterConfig(redis=acl_redis.user_url("router"), redis_password_file=acl_redis.password_file("router"))
    assert redis_of(config).ping()


def test_missing_url_or_unreadable_password_names_the_setting(monkeypatch, tmp_path):
    monkeypatch.delenv(REDIS_URL_ENV, raising=False)
    with pytest.raises(ValueError, match=f"--redis: no Redis URL .*{REDIS_URL_ENV}"):
        redis_of(RouterConfig())
    with pytest.raises(ValueError, match="--redis-password-file: cannot read"):
        redis_of(RouterConfig(redis="redis://router@h:1/0", redis_password_file=str(tmp_path / "absent")))
