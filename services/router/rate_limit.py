"""Per-API-key rate limits: a token bucket per tenant in Redis, so that every router enforces one limit.

A tenant may start ``rate`` requests per second on average and ``burst`` at once. The bucket lives
in ``keys.rate_limit(tenant)`` (a hash with a TTL) and is refilled and taken in one Lua script on
Redis's own clock (routers' clocks may disagree).
"""
from __future__ import annotations

import redis

from epserve.services.cluster.keys import Keys

_TAKE = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return tostring(wait)
"""  # KEYS: the bucket; ARGV: rate per second, burst -> seconds until a request may start (0: now, taken)


class RateLimiter:
    def __init__(self, client: redis.Redis, keys: Keys, rate: float, burst: int):
        if rate <= 0 or burst < 1:
            raise ValueError(f"need rate > 0 and burst >= 1, got {rate} and {burst}")
        self.keys, self.rate, self.burst = keys, rate, burst
        self._take = client.register_script(_TAKE)

    def wait_s(self, tenant: str) -> float:
        """0 when ``tenant`` may start a request now (one is taken from its bucket), else the seconds
        until it may."""
        return float(self._take(keys=[self.keys.rate_limit(tenant)], args=[self.rate, self.burst]))
