"""Redis-backed cluster state: placement versions and choice, expert load counters, request records."""
import json
import threading

import pytest
import redis
import torch

from epserve.services.cluster.placement import EMPTY, build_placement
from epserve.services.cluster.requests import DuplicateRequest, RequestRecord, RequestStore, TokenRun
from epserve.services.cluster.state import LoadStats, PlacementStore, choose_placement, read_load_profile
from tests.waiting import join

pytestmark = pytest.mark.integration

LAYERS = (1, 2)          # checkpoint indices of the MoE layers
E, S = 8, 4              # logical experts per layer, expert shards


def choose(client, keys, redundant=2, layers=LAYERS, **kwargs):
    return choose_placement(client, keys, num_experts=E, num_shards=S, redundant=redundant, moe_layers=layers,
                            **kwargs)


def flush_load(client, keys, load):
    """Flush ``load [rows, E]`` tokens per logical expert from every shard of a uniform placement."""
    placement = build_placement(E, S, 0, LAYERS)
    for shard in range(S):
        local = torch.tensor([placement.local_experts(layer, shard) for layer in LAYERS])   # [rows, slots]
        LoadStats(client, keys).flush(shard, placement, load.gather(1, local).long())


def write_profile(tmp_path, layers: dict) -> str:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"moe_layers": layers}))
    return str(path)


# ---- placement versions ----------------------------------------------------------------------------
def test_publish_current_and_get(redis_client, cluster_keys):
    store = PlacementStore(redis_client, cluster_keys)
    assert store.current() is None
    first = store.publish(build_placement(E, S, 0, LAYERS, version=42))
    second = store.publish(build_placement(E, S, 4, LAYERS))
    assert (first.version, second.version) == (1, 2)
    current = store.current()
    assert current.version == 2 and torch.equal(current.physical_to_logical, second.physical_to_logical)
    assert torch.equal(store.get(1).replica_counts, first.replica_counts)
    with pytest.raises(KeyError, match="placement version 3"):
        store.get(3)


# ---- choose_placement -------------------------------------------------------------------------------
def test_uniform_when_there_is_nothing(redis_client, cluster_keys):
    placement = choose(redis_client, cluster_keys)
    assert placement.version == 1
    assert torch.equal(placement.physical_to_logical, build_placement(E, S, 2, LAYERS).physical_to_logical)
    assert PlacementStore(redis_client, cluster_keys).current().version == 1


def test_hot_experts_of_the_profile_get_the_copies(redis_client, cluster_keys, tmp_path):
    profile = write_profile(tmp_path, {"1": [1, 1, 1, 50, 1, 1, 40, 1]})       # layer 2 missing: uniform
    placement = choose(redis_client, cluster_keys, profile_path=profile)
    assert placement.replica_counts[placement.row(1)].tolist() == [1, 1, 1, 2, 1, 1, 2, 1]
    assert placement.replica_counts[placement.row(2)].sum() == E + 2
    for copies in placement.logical_to_physical[placement.row(1), [3, 6]]:
        assert placement.shard_of_slot(copies[0]) != placement.shard_of_slot(copies[1])


def test_redis_load_stats_beat_the_profile(redis_client, cluster_keys, tmp_path):
    load = torch.ones(len(LAYERS), E, dtype=torch.int64)
    load[0, 5], load[1, 2] = 100, 80
    flush_load(redis_client, cluster_keys, load)
    profile = write_profile(tmp_path, {"1": [1, 1, 1, 50, 1, 1, 1, 1]})
    placement = choose(redis_client, cluster_keys, redundant=1, profile_path=profile)
    assert placement.replica_counts[0].tolist() == [1, 1, 1, 1, 1, 2, 1, 1]
    assert placement.replica_counts[1].tolist() == [1, 1, 2, 1, 1, 1, 1, 1]


def test_reuses_the_current_placement_while_it_fits(redis_client, cluster_keys):
    assert choose(redis_client, cluster_keys).version == 1
    assert choose(redis_client, cluster_keys).version == 1
    assert choose(redis_client, cluster_keys, redundant=4).version == 2       # more slots per shard
    assert choose(redis_client, cluster_keys, redundant=3).version == 3       # same slots, fewer used
    assert choose(redis_client, cluster_keys, redundant=3, layers=(1, 2, 3)).version == 4
    assert choose(redis_client, cluster_keys, redundant=3, layers=(1, 2, 3)).version == 4


def test_services_starting_together_publish_one_placement(redis_server, redis_client, cluster_keys):
    threads, barrier, versions = 4, threading.Barrier(4, timeout=30), []

    def start_service():
        client = redis.Redis.from_url(redis_server.url)
        barrier.wait()
        versions.append(choose(client, cluster_keys).version)
        client.close()

    workers = [threading.Thread(target=start_service) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        join(worker, 30, "a service to publish its placement")
    assert versions == [1] * threads
    assert int(redis_client.get(cluster_keys.placement_counter)) == 1
    assert not redis_client.exists(cluster_keys.placement_lock)


# ---- load profile file ----------------------------------------------------------------------------
def test_read_load_profile(tmp_path):
    profile = write_profile(tmp_path, {"2": [0, 1, 2, 3, 4, 5, 6, 7.5], "9": [1]})    # layer 9 not asked for
    load = read_load_profile(profile, LAYERS, E)
    assert load.dtype == torch.float64
    assert load.tolist() == [[1.0] * E, [0, 1, 2, 3, 4, 5, 6, 7.5]]


@pytest.mark.parametrize("text, match", [
    ('{"moe_layers": {"2": [1, 2]}}', "layer 2 must be a list of 8"),
    ('{"moe_layers": {"1": [1, 1, 1, 1, 1, 1, 1, -1]}}', "layer 1 must be a list of 8 non-negative"),
    ('{"moe_layers": {"1": "hot"}}', "layer 1"),
    ('{"layers": {}}', "'moe_layers' object"),
    ("{not json", "cannot read JSON"),
], ids=["short", "negative", "not-a-list", "no-moe_layers", "bad-json"])
def test_bad_load_profiles_name_the_file_and_layer(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as error:
        read_load_profile(path, LAYERS, E)
    assert str(path) in str(error.value)


# ---- load stats ------------------------------------------------------------------------------------
def test_load_stats_flush_and_read_round_trip(redis_client, cluster_keys):
    experts, redundant = 6, 1                           # 7 copies in 8 slots: one slot stays EMPTY
    placement = build_placement(experts, S, redundant, LAYERS)
    stats = LoadStats(redis_client, cluster_keys)
    assert stats.logical_load(LAYERS, experts) is None
    generator = torch.Generator().manual_seed(0)
    expected_slots, expected_load = {}, torch.zeros(len(LAYERS), experts, dtype=torch.float64)
    for _ in range(2):                                  # counters accumulate over flushes
        for shard in range(S):
            counts = torch.randint(0, 3, (len(LAYERS), placement.slots_per_shard), generator=generator)
            stats.flush(shard, placement, counts)
            for row, layer in enumerate(LAYERS):
                for local, expert in enumerate(placement.local_experts(layer, shard)):
                    slot, tokens = shard * placement.slots_per_shard + local, int(counts[row, local])
                    if expert == EMPTY or tokens == 0:
                        continue
                    key = (shard, layer, slot)
                    expected_slots[key] = expected_slots.get(key, 0) + tokens
                    expected_load[row, expert] += tokens
    for shard in range(S):
        assert stats.slot_load(shard, placement.version) == {(layer, slot): n for (s, layer, slot), n in expected_slots.items()
                                          if s == shard}
        assert stats.slot_load(shard, placement.version + 1) == {}        # per placement version
    assert torch.equal(stats.logical_load(LAYERS, experts), expected_load)
    with pytest.raises(ValueError, match=r"counts must be \[2, 2\]"):
        stats.flush(0, placement, torch.zeros(2, 3, dtype=torch.int64))


def test_both_copies_of_a_replicated_expert_are_counted(redis_client, cluster_keys):
    placement = build_placement(E, S, 1, LAYERS, load=torch.tensor([[1.0] * 7 + [9.0]] * 2))
    first, second = placement.logical_to_physical[0, 7].tolist()
    stats = LoadStats(redis_client, cluster_keys)
    for slot in (first, second):
        shard = placement.shard_of_slot(slot)
        counts = torch.zeros(len(LAYERS), placement.slots_per_shard, dtype=torch.int64)
        counts[0, slot - shard * placement.slots_per_shard] = 5
        stats.flush(shard, placement, counts)
        assert stats.slot_load(shard, placement.version) == {(LAYERS[0], slot): 5}
    assert stats.logical_load(LAYERS, E)[0, 7] == 10


# ---- request records --------------------------------------------------------------------------------
def record(request_id="r1", state="queued"):
    return RequestRecord(request_id, state, None, [5, 9, 200], {"temperature": 0.7, "max_tokens": 8}, seed=1234)


def test_request_create_get_and_states(redis_client, cluster_keys):
    requests = RequestStore(redis_client, cluster_keys)
    requests.create(record())
    assert requests.get("r1") == record()
    assert requests.get("nope") is None
    with pytest.raises(DuplicateRequest, match="'r1' already exists"):
        requests.create(record())

    assert requests.set_state("r1", "running", owner="attention-0")
    running = requests.get("r1")
    assert (running.state, running.owner, running.finish_reason) == ("running", "attention-0", None)
    assert 0 < redis_client.ttl(cluster_keys.request("r1")) <= requests.open_ttl_s  # live: expires a day on
    with pytest.raises(ValueError, match="request state"):
        requests.set_state("r1", "paused")
    with pytest.raises(KeyError, match="nope"):
        requests.set_state("nope", "running")


def runs(**ids_by_request) -> list[TokenRun]:
    """``a=(offset, [ids])`` -> one run per request."""
    return [TokenRun(rid, offset, ids) for rid, (offset, ids) in ids_by_request.items()]


def test_token_log_and_emitted_count(redis_client, cluster_keys):
    requests = RequestStore(redis_client, cluster_keys)
    for rid in ("a", "b"):
        requests.create(record(rid, "running"))
    assert requests.append_tokens(runs(a=(0, [11]), b=(0, [21, 22]))) == []               # one engine step
    assert requests.append_tokens(runs(a=(1, [12, 13]), b=(2, []))) == []
    assert requests.append_tokens(runs(a=(3, [14]), gone=(0, [1]))) == ["gone"]
    assert requests.tokens("a") == [11, 12, 13, 14] and requests.tokens("b") == [21, 22]
    assert (requests.get("a").emitted, requests.get("b").emitted) == (4, 2)
    assert requests.get("gone") is None and requests.tokens("gone") == []


def test_the_token_log_is_positional_a_retried_write_logs_nothing_twice(redis_client, cluster_keys):
    """A write retried after it landed (a timeout) is skipped; one that landed in part (a retry merged with the
    next step's tokens) logs the rest, logprobs included; a gap (tokens never logged) is logged as it comes."""
    requests = RequestStore(redis_client, cluster_keys)
    requests.create(record("a", "running"))
    first = [[-0.5, [[10, -0.5]]], [-1.0, [[11, -1.0]]]]
    assert requests.append_tokens([TokenRun("a", 0, [10, 11], first)]) == []
    assert requests.append_tokens([TokenRun("a", 0, [10, 11], first)]) == []                      # landed: skipped
    assert requests.append_tokens([TokenRun("a", 0, [10, 11, 12], first + [[-2.0, [[12, -2.0]]]])]) == []
    assert requests.token_log("a") == ([10, 11, 12], first + [[-2.0, [[12, -2.0]]]])
    assert requests.append_tokens(runs(a=(5, [15]))) == [] and requests.tokens("a") == [10, 11, 12, 15]
    assert requests.get("a").emitted == 4


def test_the_token_log_survives_a_redis_that_lost_its_scripts(redis_client, cluster_keys):
    """A restarted Redis has no scripts: the step's appends load the script again and still land, once."""
    requests = RequestStore(redis_client, cluster_keys)
    requests.create(record("a", "running"))
    assert requests.append_tokens(runs(a=(0, [11]))) == []
    redis_client.script_flush()
    assert requests.append_tokens(runs(a=(1, [12, 13]))) == []
    assert requests.tokens("a") == [11, 12, 13] and requests.get("a").emitted == 3


def test_ended_requests_expire_and_stay_ended(redis_client, cluster_keys):
    requests = RequestStore(redis_client, cluster_keys, ttl_s=600)
    for rid in ("done", "cancelled"):
        requests.create(record(rid, "running"))
        requests.append_tokens(runs(**{rid: (0, [7, 8])}))
    assert requests.set_state("done", "finished", finish_reason="length")
    assert requests.set_state("cancelled", "aborted", finish_reason="abort")
    for rid in ("done", "cancelled"):
        assert 0 < redis_client.ttl(cluster_keys.request(rid)) <= 600
        assert 0 < redis_client.ttl(cluster_keys.tokens(rid)) <= 600
    assert requests.get("done").finish_reason == "length"

    assert not requests.set_state("cancelled", "running", owner="attention-1")    # an ended request stays ended
    assert requests.append_tokens(runs(cancelled=(2, [9]), done=(2, [9]))) == ["cancelled"]   # late: finished
    assert requests.get("cancelled").state == "aborted" and requests.tokens("cancelled") == [7, 8]
    assert requests.tokens("done") == [7, 8, 9] and 0 < redis_client.ttl(cluster_keys.tokens("done")) <= 600


def test_reopen_and_refuse(redis_client, cluster_keys):
    requests = RequestStore(redis_client, cluster_keys, ttl_s=600, open_ttl_s=7200)
    for rid in ("ran", "never"):
        requests.create(record(rid, "running"))
    requests.append_tokens(runs(ran=(0, [7, 8])))
    assert 600 < redis_client.ttl(cluster_keys.tokens("ran")) <= 7200                # the log expires too
    requests.set_state("ran", "aborted", finish_reason="abort")
    requests.reopen("ran")                                                     # a client resumes it
    reopened = requests.get("ran")
    assert (reopened.state, reopened.finish_reason, requests.tokens("ran")) == ("queued", None, [7, 8])
    assert 600 < redis_client.ttl(cluster_keys.request("ran")) <= 7200
    with pytest.raises(KeyError, match="nope"):
        requests.reopen("nope")
    requests.refuse("never")                                                   # nothing ran: nothing kept
    assert requests.get("never") is None and not redis_client.exists(cluster_keys.tokens("never"))
    requests.refuse("ran")
    assert requests.get("ran").state == "failed" and requests.tokens("ran") == [7, 8]


def test_logical_load_over_a_sliding_window(redis_client, cluster_keys):
    placement = build_placement(4, 1, 0, [1])
    stats = LoadStats(redis_client, cluster_keys)
    slots = placement.slots_per_shard
    old, recent = torch.zeros(1, slots, dtype=torch.int64), torch.zeros(1, slots, dtype=torch.int64)
    old[0, 0], recent[0, 1] = 100, 7                       # slot i holds expert i (one shard, no copies)
    t = 1_000_000.0
    stats.flush(0, placement, old, now=t - 10 * LoadStats.BUCKET_S)
    stats.flush(0, placement, recent, now=t)
    assert stats.logical_load([1], 4).tolist() == [[100.0, 7.0, 0.0, 0.0]]                 # since the start
    assert stats.logical_load([1], 4, window_s=120, now=t).tolist() == [[0.0, 7.0, 0.0, 0.0]]
    assert stats.logical_load([1], 4, window_s=11 * LoadStats.BUCKET_S, now=t).tolist() == [[100.0, 7.0, 0.0, 0.0]]
    assert stats.logical_load([1], 4, window_s=60, now=t + 3 * LoadStats.BUCKET_S) is None  # nothing lately
    ttl = redis_client.ttl(cluster_keys.expert_load_bucket(1, int(t // LoadStats.BUCKET_S)))
    assert 0 < ttl <= LoadStats.BUCKET_S * (LoadStats.KEEP_BUCKETS + 1)
