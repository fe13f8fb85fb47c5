"""Request records and token logs in Redis (no torch: the router keeps them).

Each request's record holds enough to continue it elsewhere; its token log holds every token
emitted so far (and their logprobs, for a request that asked for them). Both expire a while after
the request ends.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import redis
from redis.exceptions import NoScriptError

from epserve.services.cluster.keys import Keys, text


REQUEST_STATES = ("queued", "running", "finished", "aborted", "failed")
TERMINAL_STATES = ("finished", "aborted", "failed")

_SET_STATE = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return -1 end
if state == 'finished' or state == 'aborted' or state == 'failed' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
if tonumber(ARGV[1]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[1])
end
return 1
"""  # KEYS: record, token log; ARGV: TTL seconds (0: none), field, value, ... -> -1 none, 0 terminal, 1 set

_APPEND = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'aborted' or state == 'failed' then return 0 end
if ARGV[4] == '' then
  redis.call('XADD', KEYS[2], '*', 'ids', ARGV[1])
else
  redis.call('XADD', KEYS[2], '*', 'ids', ARGV[1], 'logprobs', ARGV[4])
end
local ttl = tonumber(ARGV[3])
if state == 'finished' then ttl = math.max(1, redis.call('TTL', KEYS[1])) end
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('HINCRBY', KEYS[1], 'emitted', ARGV[2])
return 1
"""  # KEYS: record, token log; ARGV: comma-joined ids, how many, TTL, their logprobs as JSON ('' for none)
# -> 0 when the request is gone or was aborted or failed. A finished request still takes its last tokens: the
# log is written asynchronously.


_REOPEN = """
if not redis.call('HGET', KEYS[1], 'state') then return 0 end
redis.call('HSET', KEYS[1], 'state', 'queued')
redis.call('HDEL', KEYS[1], 'finish_reason')
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 1
"""  # KEYS: record, token log; ARGV: TTL -> 0 when there is no record

_REFUSE = """
if tonumber(redis.call('HGET', KEYS[1], 'emitted') or '0') == 0 then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'failed')
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 1
"""  # KEYS: record, token log; ARGV: TTL -> 0 deleted (nothing ran), 1 kept as failed


class DuplicateRequest(ValueError):
    """A record with this request id already exists."""


@dataclass
class RequestRecord:
    """What a request needs to run, or to be continued on another replica."""

    request_id: str
    state: str                       # one of REQUEST_STATES
    owner: str | None                # id of the attention replica running it (None while unassigned)
    prompt_ids: list[int]
    sampling: dict                   # sampling parameters as given (temperature, top_p, max_tokens, ...)
    seed: int                        # with the step index, makes sampling reproducible elsewhere
    emitted: int = 0                 # tokens appended to the token log so far
    finish_reason: str | None = None

    def to_fields(self) -> dict[str, str]:
        fields = {k: v for k, v in asdict(self).items() if v is not None}
        fields.update(prompt_ids=json.dumps(self.prompt_ids), sampling=json.dumps(self.sampling))
        return {k: str(v) for k, v in fields.items()}

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> "RequestRecord":
        return cls(fields["request_id"], fields["state"], fields.get("owner"), json.loads(fields["prompt_ids"]),
                   json.loads(fields["sampling"]), int(fields["seed"]), int(fields.get("emitted", 0)),
                   fields.get("finish_reason"))


def _check_state(state: str) -> None:
    if state not in REQUEST_STATES:
        raise ValueError(f"request state must be one of {REQUEST_STATES}, got {state!r}")


class RequestStore:
    """Request records (hashes) and token logs (streams): both expire ``ttl_s`` after the request ends,
    and ``open_ttl_s`` after creation (or the last token) when nothing ends them (a router gone for good)."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl_s: int = 3600, open_ttl_s: int = 86400):
        self.client, self.keys, self.ttl_s, self.open_ttl_s = client, keys, ttl_s, open_ttl_s
        self._set_state = client.register_script(_SET_STATE)
        self._append = client.register_script(_APPEND)
        self._reopen = client.register_script(_REOPEN)
        self._refuse = client.register_script(_REFUSE)

    def create(self, record: RequestRecord) -> None:
        """Store a new record; DuplicateRequest if its id exists (checked atomically with WATCH)."""
        _check_state(record.state)
        key = self.keys.request(record.request_id)
        with self.client.pipeline() as pipe:
            try:
                pipe.watch(key)
                if pipe.exists(key):
                    raise DuplicateRequest(f"request {record.request_id!r} already exists")
                pipe.multi()
                pipe.hset(key, mapping=record.to_fields())
                pipe.expire(key, self.ttl_s if record.state in TERMINAL_STATES else self.open_ttl_s)
                pipe.execute()
            except redis.WatchError:
                raise DuplicateRequest(f"request {record.request_id!r} already exists") from None

    def get(self, request_id: str) -> RequestRecord | None:
        fields = self.client.hgetall(self.keys.request(request_id))
        return RequestRecord.from_fields({text(k): text(v) for k, v in fields.items()}) if fields else None

    def set_state(self, request_id: str, state: str, owner: str | None = None,
                  finish_reason: str | None = None) -> bool:
        """Move the request to ``state`` (and set owner / finish reason when given).

        False, changing nothing, when the request already ended (finished/aborted/failed);
        KeyError when there is no such record. Ending it starts the record's and log's TTL.
        """
        _check_state(state)
        fields = ["state", state]
        fields += ["owner", owner] if owner is not None else []
        fields += ["finish_reason", finish_reason] if finish_reason is not None else []
        ttl = self.ttl_s if state in TERMINAL_STATES else 0
        done = self._set_state(keys=[self.keys.request(request_id), self.keys.tokens(request_id)],
                               args=[ttl, *fields])
        if done < 0:
            raise KeyError(f"no request record {request_id!r}")
        return bool(done)

    def reopen(self, request_id: str) -> None:
        """Make the request queued again, whatever its state (a client resuming it): its token log is
        kept; both expire ``open_ttl_s`` from now unless it ends. KeyError when there is no such record."""
        if not self._reopen(keys=[self.keys.request(request_id), self.keys.tokens(request_id)], args=[self.open_ttl_s]):
            raise KeyError(f"no request record {request_id!r}")

    def refuse(self, request_id: str) -> None:
        """A request admission refused: forgotten (prompt and all) when it never emitted a token, else failed."""
        self._refuse(keys=[self.keys.request(request_id), self.keys.tokens(request_id)], args=[self.ttl_s])

    def append_tokens(self, batch: dict[str, list[int]], logprobs: dict[str, list] | None = None) -> list[str]:
        """Append one engine step's new token ids per request, in one pipeline.

        Each request's ids become one stream entry and add to its ``emitted``; ``logprobs`` has, for
        the requests that asked for them, one JSON-able entry per id (``services.params.logprobs_to_log``),
        kept in the same entry. Returns the ids not appended because their request ended or has no
        record (the engine can drop them).
        """
        batch, logprobs = {rid: ids for rid, ids in batch.items() if ids}, logprobs or {}
        calls = [(self.keys.request(rid), self.keys.tokens(rid), ",".join(str(int(t)) for t in ids), len(ids),
                  self.open_ttl_s, json.dumps(logprobs[rid]) if rid in logprobs else "") for rid, ids in batch.items()]
        results = self._append_all(calls) if calls else []
        return [rid for rid, appended in zip(batch, results) if not appended]

    def _append_all(self, calls: list[tuple]) -> list:
        """The append script's EVALSHA for each call (its 2 keys, then its args) in one pipeline: one round
        trip per engine step (a registered script in a pipeline adds a SCRIPT EXISTS round trip to every
        execute). A Redis that lost the script (restarted) has it loaded again, and the pipeline runs again."""
        try:
            return self._appends(calls).execute()
        except NoScriptError:
            self.client.script_load(self._append.script)
            return self._appends(calls).execute()

    def _appends(self, calls: list[tuple]) -> redis.client.Pipeline:
        pipe = self.client.pipeline(transaction=False)
        for call in calls:
            pipe.evalsha(self._append.sha, 2, *call)
        return pipe

    def tokens(self, request_id: str) -> list[int]:
        """Every token id emitted so far, in order (from the token log)."""
        return self.token_log(request_id)[0]

    def token_log(self, request_id: str) -> tuple[list[int], list | None]:
        """Every token id emitted so far, in order, and their logprobs entries (None unless every step
        logged them: a request that did not ask)."""
        ids, logprobs = [], []
        for _, entry in self.client.xrange(self.keys.tokens(request_id)):
            fields = {text(k): text(v) for k, v in entry.items()}
            ids += [int(t) for t in fields["ids"].split(",")]
            if logprobs is not None and "logprobs" in fields:
                logprobs += json.loads(fields["logprobs"])
            else:
                logprobs = None
        return ids, logprobs
