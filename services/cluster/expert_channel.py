"""What every channel to an expert shard shares: its error and the byte counters of wire accounting."""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field

import grpc


class ExpertShardError(RuntimeError):
    """The stream to an expert shard broke; ``code`` is the gRPC status when the shard sent one."""

    def __init__(self, shard: int, address: str, reason: str, code: grpc.StatusCode | None = None):
        super().__init__(f"expert shard {shard} at {address}: {reason}")
        self.shard, self.address, self.code = shard, address, code


@dataclass
class TransportStats:
    """Bytes moved and batches sent, per shard: protobuf message bytes on gRPC (no HTTP/2 framing),
    header + tensor bytes on the local transport. Thread-safe."""

    bytes_sent: dict[int, int] = field(default_factory=lambda: collections.defaultdict(int))
    bytes_received: dict[int, int] = field(default_factory=lambda: collections.defaultdict(int))
    messages: dict[int, int] = field(default_factory=lambda: collections.defaultdict(int))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_sent(self, shard: int, nbytes: int) -> None:
        with self._lock:
            self.bytes_sent[shard] += nbytes
            self.messages[shard] += 1

    def add_received(self, shard: int, nbytes: int) -> None:
        with self._lock:
            self.bytes_received[shard] += nbytes

    def totals(self) -> tuple[int, int, int]:
        """(bytes sent, bytes received, messages sent) over all shards."""
        with self._lock:
            return sum(self.bytes_sent.values()), sum(self.bytes_received.values()), sum(self.messages.values())

    def reset(self) -> None:
        with self._lock:
            self.bytes_sent.clear()
            self.bytes_received.clear()
            self.messages.clear()
