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
local count = tonumber(ARGV[2])
local logged = tonumber(redis.call('HGET', KEYS[1], 'emitted') or '0') - tonumber(ARGV[5])
if logged >= count then return 1 end
local ids, entries = ARGV[1], ARGV[4]
if logged > 0 then
  local each = {}
  for id in string.gmatch(ids, '[^,]+') do each[#each + 1] = id end
  ids = table.concat(each, ',', logged + 1)
  if entries ~= '' then
    each = {}
    for entry in string.gmatch(entries, '[^\\n]+') do each[#each + 1] = entry end
    entries = table.concat(each, '\\n', logged + 1)
  end
  count = count - logged
end
if entries == '' then
  redis.call('XADD', KEYS[2], '*', 'ids', ids)
else
  redis.call('XADD', KEYS[2], '*', 'ids', ids, 'logprobs', '[' .. (string.gsub(entries, '\\n', ',')) .. ']')
end
local ttl = tonumber(ARGV[3])
if state == 'finished' then ttl = math.max(1, redis.call('TTL', KEYS[1])) end
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('HINCRBY', KEYS[1], 'emitted', count)
return 1
"""  # KEYS: record, token log; ARGV: comma-joined ids, how many, TTL, their logprobs (one JSON entry per id, joined
# by newlines; '' for none), how many the request emitted before the first of them -> 0 when the request is gone or
# was aborted or failed. Positional: ids the log holds already (``emitted`` is past them: a write retried after it
# landed, a resumed request's replica catching up) are skipped, so a retry never logs a token twice. A finished
# request still takes its last tokens: the log is written asynchronously.


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


@dataclass
class TokenRun:
    """Consecutive new tokens of one request, for its token log."""

    request_id: str
    offset: int                       # tokens the request emitted before the first of these (its position)
    ids: list[int]
    logprobs: list | None = None      # one JSON-able entry per id (``params.logprobs_to_log``) if it asked


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

    def append_tokens(self, runs: list[TokenRun]) -> list[str]:
        """Append runs of new token ids (an engine step's, or several steps' of one request), in one pipeline.

        Each run becomes one stream entry and adds to its request's ``emitted``, except for the ids the log
        holds already (positions below ``emitted``: the write is retried, safely, after a timeout that left it
        unclear whether it landed). Returns the ids of requests whose runs were not appended because the
        request ended or has no record (the engine can drop them).
        """
        runs = [run for run in runs if run.ids]
        calls = [(self.keys.request(run.request_id), self.keys.tokens(run.request_id),
                  ",".join(str(int(t)) for t in run.ids), len(run.ids), self.open_ttl_s,
                  "\n".join(json.dumps(e) for e in run.logprobs or ()), run.offset) for run in runs]
        results = self._append_all(calls) if calls else []
        return list(dict.fromkeys(run.request_id for run, appended in zip(runs, results) if not appended))

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
