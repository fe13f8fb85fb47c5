"""What a live placement switch and an expert-shard fail-over cost the token streams, under ``epserve up``.

    python -m benchmarks.bench_live_placement [--model tiny] [--streams 16] [--new-tokens 300]
                                              [--expert-shards 3] [--redundant-experts 2]

One cluster (``--rebalance-interval 0``: switches only on request; ``--restart-delay 600``: a killed
shard stays dead, as a real checkpoint's would for minutes). A warm-up round leaves expert load in
Redis. Then ``--streams`` concurrent greedy streams, each chunk's arrival time recorded:

1. **switch**: 2 s in, a forced rebalance (two-phase: propose, load, commit; the replica moves at a
   step boundary). Prints the longest gap between two chunks of a stream while the switch ran
   (request to 1 s after the replica reported the new version) against the gaps outside it.
2. **fail-over**: 2 s in, SIGKILL of expert shard 1. Prints, per stream, the stall (kill to its next
   chunk) and the longest wait for a chunk from the kill to 1 s after the fail-over placement's commit
   (a chunk already on its way at the kill ends the first, not the second), p50 and max, the time to
   the commit, and failed streams.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import redis

from epserve.services.cluster.controller import request_rebalance
from epserve.services.cluster.keys import Keys
from epserve.services.cluster.placement_versions import current_version
from epserve.services.cluster.registry import Registry
from epserve.services.up_state import find_service, read_up_state, wait_ready

EVENT_AT_S = 2.0


def stream_all(endpoint: str, prompts: list[list[int]], new_tokens: int):
    """Start streaming every prompt at once -> (chunk arrival times per stream (monotonic, filled as they
    come), the streaming threads, [failed streams])."""
    from epserve_client import Client, EpserveError

    arrivals, failed = [[] for _ in prompts], [0]

    def one(i: int) -> None:
        try:
            with Client(endpoint, timeout=600) as client:
                for _ in client.stream(prompts[i], max_tokens=new_tokens, temperature=0, ignore_eos=True):
                    arrivals[i].append(time.monotonic())
        except EpserveError:
            failed[0] += 1

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    return arrivals, threads, failed


def gaps(arrivals: list[list[float]], start: float, end: float, inside: bool) -> list[float]:
    """Gaps between consecutive chunks of each stream that end inside (or outside) [start, end]."""
    return [b - a for times in arrivals for a, b in zip(times, times[1:]) if (start <= b <= end) == inside]


def switch_phase(args, up, client, keys, prompts) -> None:
    arrivals, threads, failed = stream_all(up["endpoint"], prompts, args.new_tokens)
    time.sleep(EVENT_AT_S)
    before = current_version(client, keys)
    start = time.monotonic()
    answer = request_rebalance(client, keys, force=True, timeout_s=300)
    committed = time.monotonic()
    registry = Registry(client, keys)
    while any(r.info.get("placement_version") != answer["committed"] for r in registry.live("attention")):
        time.sleep(0.01)
    moved = time.monotonic()
    for thread in threads:
        thread.join()
    inside, outside = gaps(arrivals, start, moved + 1.0, True), gaps(arrivals, start, moved + 1.0, False)
    print(f"switch v{before} -> v{answer['committed']} ({answer['reason']}): commit {committed - start:.3f} s after "
          f"the request, replica moved {moved - committed:.3f} s later; {failed[0]} failed streams")
    print(f"  chunk gap during the switch: max {1e3 * max(inside):.1f} ms, median {1e3 * statistics.median(inside):.1f} "
          f"ms ({len(inside)} gaps); outside it: max {1e3 * max(outside):.1f} ms, median "
          f"{1e3 * statistics.median(outside):.1f} ms ({len(outside)} gaps)")


def fail_over_phase(args, up, state_file, client, keys, prompts) -> None:
    arrivals, threads, failed = stream_all(up["endpoint"], prompts, args.new_tokens)
    time.sleep(EVENT_AT_S)
    before = current_version(client, keys)
    os.kill(find_service(read_up_state(state_file), "expert", "1")["pid"], signal.SIGKILL)
    killed = time.monotonic()
    while current_version(client, keys) == before and time.monotonic() < killed + 120:
        time.sleep(0.01)
    committed = time.monotonic()
    for thread in threads:
        thread.join()
    live = [times for times in arrivals if times and times[-1] > killed]
    stalls = [next(t for t in times if t > killed) - killed for times in live]
    longest = [max(b - max(a, killed) for a, b in zip(times, times[1:]) if b > killed and a < committed + 1.0)
               for times in live if len(times) > 1]
    print(f"fail-over v{before} -> v{current_version(client, keys)}: committed {committed - killed:.3f} s after the "
          f"kill; {failed[0]} failed streams")
    if stalls:
        print(f"  stall (kill to the next chunk) over {len(stalls)} streams: p50 {statistics.median(stalls):.3f} s, "
              f"max {max(stalls):.3f} s")
    if longest:
        print(f"  longest wait for a chunk from the kill to 1 s after the commit, per stream: p50 "
              f"{statistics.median(longest):.3f} s, max {max(longest):.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=300)
    parser.add_argument("--expert-shards", type=int, default=3)
    parser.add_argument("--redundant-experts", type=int, default=2)
    parser.add_argument("--port", type=int, default=50091)
    args = parser.parse_args()
    state_file = os.path.join(tempfile.mkdtemp(prefix="bench-live-"), "up.json")
    command = [sys.executable, "-m", "epserve.services.cli", "up", "--model", args.model, "--port", str(args.port),
               "--http-port", str(args.port + 1),
               "--expert-shards", str(args.expert_shards), "--redundant-experts", str(args.redundant_experts),
               "--rebalance-interval", "0", "--restart-delay", "600", "--state-file", state_file]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        up = wait_ready(state_file, process, timeout_s=600)
        client, keys = redis.Redis.from_url(up["redis_url"]), Keys(up["cluster"])
        prompts = [[(7 * i + 3 * j) % 250 + 2 for j in range(3 + (5 * i) % 23)] for i in range(args.streams)]
        for _, threads, _ in [stream_all(up["endpoint"], prompts, 32)]:             # warm-up: load in Redis
            for thread in threads:
                thread.join()
        switch_phase(args, up, client, keys, prompts)
        fail_over_phase(args, up, state_file, client, keys, prompts)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)


if __name__ == "__main__":
    main()
