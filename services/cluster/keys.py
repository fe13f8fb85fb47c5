"""Every Redis key of an epserve cluster. Nothing else in the code spells a key.

All keys live under ``epserve:{cluster}:``. What each holds:

- ``svc:{kind}:{id}`` hash, TTL-refreshed by the service's heartbeat: address, capacity, version.
  ``svcs:{kind}`` set of ids that ever registered; a member whose hash expired is dead and pruned.
- ``req:{request_id}`` hash: the request record (state, owner replica, prompt ids, sampling params,
  seed, tokens emitted so far) - enough to continue it on another replica.
  ``tok:{request_id}`` stream: the request's token log, one entry per engine step.
- ``placement:{version}`` string (JSON placement); ``placement:current`` its version;
  ``placement:next`` the version counter; ``placement:lock`` string with TTL, held by the one
  starting service that builds and publishes a placement when none current fits.
  ``placement:pending`` the version the placement controller proposed and has not committed;
  ``placement:{version}:ready`` set of the shards that loaded it (with a TTL).
  ``placement:rebalance`` string with TTL: a token asking the controller to re-plan now;
  ``placement:rebalance:{token}`` its answer (JSON, with TTL).
- ``load:{moe_layer}`` hash logical expert -> tokens routed (placement input), since the start;
  ``load:{moe_layer}:{bucket}`` the same for one time bucket (``LoadStats.BUCKET_S`` seconds; the
  sliding window sums the last ones), expiring after ``LoadStats.KEEP_BUCKETS`` buckets;
  ``slot_load:{shard}`` hash ``"{version}:{moe_layer}:{slot}"`` -> tokens served by that physical
  slot of placement ``version``.
- ``ratelimit:{tenant}`` hash with TTL: an API key's token bucket (``router.rate_limit``).
- ``balancer:lease`` string with TTL: the id of the placement controller that leads (``controller``).
"""
from __future__ import annotations

from dataclasses import dataclass

SERVICE_KINDS = ("router", "attention", "expert")


@dataclass(frozen=True)
class Keys:
    cluster: str = "default"

    @property
    def prefix(self) -> str:
        return f"epserve:{self.cluster}"

    def service(self, kind: str, service_id: str) -> str:
        _check_kind(kind)
        return f"{self.prefix}:svc:{kind}:{service_id}"

    def services(self, kind: str) -> str:
        _check_kind(kind)
        return f"{self.prefix}:svcs:{kind}"

    def request(self, request_id: str) -> str:
        return f"{self.prefix}:req:{request_id}"

    def tokens(self, request_id: str) -> str:
        return f"{self.prefix}:tok:{request_id}"

    def placement(self, version: int) -> str:
        return f"{self.prefix}:placement:{version}"

    @property
    def placement_current(self) -> str:
        return f"{self.prefix}:placement:current"

    @property
    def placement_counter(self) -> str:
        return f"{self.prefix}:placement:next"

    @property
    def placement_lock(self) -> str:
        return f"{self.prefix}:placement:lock"

    @property
    def placement_pending(self) -> str:
        return f"{self.prefix}:placement:pending"

    def placement_ready(self, version: int) -> str:
        return f"{self.prefix}:placement:{version}:ready"

    @property
    def rebalance_request(self) -> str:
        return f"{self.prefix}:placement:rebalance"

    def rebalance_answer(self, token: str) -> str:
        return f"{self.prefix}:placement:rebalance:{token}"

    def expert_load(self, moe_layer: int) -> str:
        return f"{self.prefix}:load:{moe_layer}"

    def expert_load_bucket(self, moe_layer: int, bucket: int) -> str:
        return f"{self.prefix}:load:{moe_layer}:{bucket}"

    def slot_load(self, shard: int) -> str:
        return f"{self.prefix}:slot_load:{shard}"

    def rate_limit(self, tenant: str) -> str:
        return f"{self.prefix}:ratelimit:{tenant or '-'}"

    @property
    def balancer_lease(self) -> str:
        return f"{self.prefix}:balancer:lease"

    def all_keys_pattern(self) -> str:
        return f"{self.prefix}:*"


def _check_kind(kind: str) -> None:
    if kind not in SERVICE_KINDS:
        raise ValueError(f"service kind must be one of {SERVICE_KINDS}, got {kind!r}")


def text(value: bytes | str) -> str:
    """A Redis reply as ``str`` (clients made without ``decode_responses`` return bytes)."""
    return value.decode() if isinstance(value, bytes) else value
