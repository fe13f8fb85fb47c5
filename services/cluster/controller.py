"""The placement controller: re-plans expert placement from live load and switches it with no stall.

Every expert shard runs one (``ExpertConfig.controller``); the holder of the Redis lease
``balancer:lease`` leads, the others wait to take over, watching the registry meanwhile so that a new
leader knows which shards were live (and so which died: maybe the old leader's own). Each ``TICK_S`` the leader looks at the
current placement, the live shards (registry) and the expert load of the last ``window_s``::

    a shard that holds slots stopped heartbeating     -> fail-over: plan onto the live shards
    a live shard holds nothing (back, or new)         -> recovery: plan onto every live shard
    every interval_s, or ``epserve placement rebalance`` -> plan from the load; switch only if the
                                                          balancedness gains >= threshold (or forced)

and switches in two phases (``switch``): propose v+1 (pending) -> every shard that holds slots in
it loads them in the background while serving v, and marks itself ready -> commit v+1 (current).
Attention replicas take v+1 at their next step boundary (one step uses one version end to end);
shards free v once no live replica reports it (``expert.follower``). A proposal whose shards are
not all ready within ``ready_timeout_s``, or one of whose shards dies meanwhile, is abandoned and
re-planned at the next tick.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass

import redis
import torch

from epserve.services.cluster.keys import Keys, text
from epserve.services.cluster.placement import Placement, build_placement
from epserve.services.cluster.planner import balancedness
from epserve.services.cluster.registry import Registry
from epserve.services.cluster.state import LoadStats, PlacementStore
from epserve.services.metrics import BALANCEDNESS

log = logging.getLogger(__name__)

LEASE_TTL_S = 3.0             # a leader that stops renewing is replaced after this long
TICK_S = 0.5
LOAD_EVERY_S = 5.0            # the window's load is read this often (at once for a re-plan)
ANSWER_TTL_S = 600            # how long an answer to a rebalance request stays readable

_LEAD = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] or (not holder and redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""  # KEYS: balancer:lease; ARGV: holder id, TTL ms. Take the lease if free, renew it if ours.

_TAKE = """
local value = redis.call('GET', KEYS[1])
if value then redis.call('DEL', KEYS[1]) end
return value
"""  # KEYS: placement:rebalance. GET and DEL in one step (GETDEL needs Redis 6.2).


@dataclass(frozen=True)
class Decision:
    """What a tick decided: a placement to switch to (or None) and why."""

    placement: Placement | None
    reason: str
    before: float | None = None          # expected balancedness now, by the window's load
    after: float | None = None           # and with ``placement``


def shard_capacity(live: dict[int, float], num_shards: int) -> torch.Tensor:
    """[S] float64: each shard's declared capacity (1 for a shard not live)."""
    return torch.tensor([live.get(s, 1.0) for s in range(num_shards)], dtype=torch.float64)


def decide(current: Placement, live: dict[int, float], seen: set[int], load: torch.Tensor | None, *,
           redundant: int, threshold: float, rebalance: bool, force: bool = False) -> Decision:
    """One tick's decision (pure): ``live`` maps each live shard to its capacity, ``seen`` holds the
    shards seen live before (a shard that never came up yet is not dead), ``load [rows, E]`` the
    window's tokens per logical expert (None: none counted), ``rebalance`` whether a re-plan is due."""
    in_use = set(current.shards_in_use())
    capacity = shard_capacity(live, current.num_shards)
    shape = (current.num_experts, current.num_shards, redundant, current.moe_layers)

    def on(shards, why):
        return build_placement(*shape, load, capacity=capacity, shards=sorted(shards)), why

    dead = (in_use & seen) - live.keys()
    if dead:
        if not live:
            return Decision(None, f"fail-over needed for shards {sorted(dead)}, but no shard is live")
        return Decision(*on(live, f"fail-over: shards {sorted(dead)} stopped answering"))
    idle = live.keys() - in_use
    if idle and not in_use - live.keys():
        return Decision(*on(live, f"recovery: shards {sorted(idle)} hold no slots"))
    if not rebalance:
        return Decision(None, "nothing to do")
    if load is None:
        return Decision(None, "no expert load counted in the window")
    members = current.members()
    before = balancedness(load, members, capacity)
    candidate, _ = on(in_use, "")
    after = balancedness(load, candidate.members(), capacity)
    if after - before < threshold and not force:
        return Decision(None, f"gain {after - before:.4f} below the threshold {threshold}", before, after)
    return Decision(candidate, f"rebalance: balancedness {before:.4f} -> {after:.4f}", before, after)


class PlacementController:
    def __init__(self, client: redis.Redis, keys: Keys, *, redundant: int, interval_s: float, threshold: float,
                 window_s: float, ready_timeout_s: float):
        self.client, self.keys = client, keys
        self.store, self.registry, self.stats = PlacementStore(client, keys), Registry(client, keys), LoadStats(client, keys)
        self.redundant, self.interval_s, self.threshold = redundant, interval_s, threshold
        self.window_s, self.ready_timeout_s = window_s, ready_timeout_s
        self.holder = uuid.uuid4().hex
        self._lead = client.register_script(_LEAD)
        self._take = client.register_script(_TAKE)
        self._seen: set[int] = set()
        self._load, self._load_at = None, float("-inf")
        self._next_rebalance = time.monotonic() + interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="placement-controller", daemon=True)

    def start(self) -> "PlacementController":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def leads(self) -> bool:
        """Take or renew the lease; whether this controller leads."""
        return bool(self._lead(keys=[self.keys.balancer_lease], args=[self.holder, round(LEASE_TTL_S * 1000)]))

    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                live = self._live_shards()                    # followers watch too: a new leader knows who died
                if self.leads():
                    self.tick(live)
            except redis.RedisError as err:                   # Redis away: try again next tick
                log.warning("placement controller: %s", err)
            except Exception:                                 # noqa: BLE001 - keep controlling
                log.exception("placement controller: tick failed")

    def _live_shards(self) -> dict[int, float]:
        """Live shard -> its capacity; remembers every shard seen live."""
        live = {int(s.service_id): float(s.info.get("capacity", 1.0)) for s in self.registry.live("expert")}
        self._seen |= live.keys()
        return live

    def tick(self, live: dict[int, float] | None = None) -> Decision | None:
        """Look once (``live``: the live shards, default: read now); switch placement when the decision
        says so. The decision, None before any placement."""
        current = self.store.current()
        if current is None:
            return None
        live = self._live_shards() if live is None else live
        request = self._take(keys=[self.keys.rebalance_request])
        request = json.loads(text(request)) if request else None
        due = self.interval_s > 0 and time.monotonic() >= self._next_rebalance
        load = self._window_load(current, live, fresh=due or request is not None)
        decision = decide(current, live, self._seen, load, redundant=self.redundant, threshold=self.threshold,
                          rebalance=due or request is not None, force=bool(request and request.get("force")))
        if due:
            self._next_rebalance = time.monotonic() + self.interval_s
        committed = None
        if decision.placement is not None:
            log.info("placement controller: %s", decision.reason)
            committed = self.switch(decision.placement)
        if request is not None:
            self._answer(request["token"], decision, committed)
        return decision

    def _window_load(self, current: Placement, live: dict[int, float], fresh: bool) -> torch.Tensor | None:
        """The window's load per logical expert (read at most every ``LOAD_EVERY_S`` unless ``fresh``);
        exports the current placement's expected balancedness under it."""
        if fresh or time.monotonic() >= self._load_at + LOAD_EVERY_S:
            self._load = self.stats.logical_load(current.moe_layers, current.num_experts, self.window_s)
            self._load_at = time.monotonic()
            if self._load is not None and self._load.shape[0] == len(current.moe_layers):
                capacity = shard_capacity(live, current.num_shards)
                BALANCEDNESS.set(balancedness(self._load, current.members(), capacity))
        return self._load

    def switch(self, placement: Placement) -> int | None:
        """Propose ``placement``, wait for its shards to load it, commit. Its version, or None if abandoned."""
        proposed = self.store.propose(placement)
        needed = set(proposed.shards_in_use())
        deadline = time.monotonic() + self.ready_timeout_s
        while not self._stop.is_set():
            missing = needed - self.store.ready(proposed.version)
            if not missing:
                self.store.commit(proposed.version)
                log.info("placement controller: committed v%d", proposed.version)
                return proposed.version
            live = {int(s.service_id) for s in self.registry.live("expert")}
            why = ("shards %s died" % sorted(missing - live) if missing - live
                   else "timed out" if time.monotonic() > deadline else "lost the lease" if not self.leads() else None)
            if why:
                log.warning("placement controller: abandoning v%d (%s; not ready: %s)", proposed.version, why,
                            sorted(missing))
                break
            time.sleep(0.05)
        self.store.abandon(proposed.version)
        return None

    def _answer(self, token: str, decision: Decision, committed: int | None) -> None:
        answer = {"committed": committed, "reason": decision.reason, "before": decision.before,
                  "after": decision.after}
        self.client.set(self.keys.rebalance_answer(token), json.dumps(answer), ex=ANSWER_TTL_S)


def request_rebalance(client: redis.Redis, keys: Keys, *, force: bool, timeout_s: float) -> dict:
    """Ask the leading controller to re-plan now and wait for its answer (TimeoutError without one)."""
    token = uuid.uuid4().hex
    client.set(keys.rebalance_request, json.dumps({"token": token, "force": force}), ex=max(1, round(timeout_s)))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = client.get(keys.rebalance_answer(token))
        if answer is not None:
            return json.loads(answer)
        time.sleep(0.1)
    raise TimeoutError(f"no placement controller answered within {timeout_s} s (is an expert shard with "
                       f"--controller running?)")
