"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step, each running sequence that is decoding gets one token; then sequences still
prefilling, then waiting ones, get prompt chunks from what is left of the token budget
(chunked prefill). A sequence joins when it fits (a sequence slot, its first chunk's blocks) and
leaves when it finishes or is aborted, freeing its blocks at once. When blocks run out for a
decode, the newest running sequence is preempted: its blocks are freed and it waits to be
recomputed from its tokens so far (nothing it emitted is lost).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from epserve.services.engine.block_manager import BlockManager
from epserve.services.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """What the next step computes: decodes first (one token each), then prefill chunks."""

    decodes: list[Sequence]
    prefills: list[tuple[Sequence, int]]          # (sequence, tokens in this chunk)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.blocks = blocks
        self.max_num_seqs, self.token_budget = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []           # in admission order

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove ``seq`` from the queues and free its blocks (finish or abort)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([], [])
        budget = self.token_budget - self._schedule_decodes(batch)
        for seq in [s for s in self.running if s.num_pending > 1]:     # prefills already underway
            budget -= self._schedule_chunk(batch, seq, budget)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            taken = self._schedule_chunk(batch, seq, budget)
            if not taken:
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            budget -= taken
        return batch

    def _schedule_decodes(self, batch: ScheduledBatch) -> int:
        for seq in [s for s in self.running if s.num_pending == 1]:
            if len(batch.decodes) >= self.token_budget:
                break
            while seq.status is Status.RUNNING and not self.blocks.can_grow(seq, seq.num_tokens):
                self._preempt(self.running[-1])
            if seq.status is Status.RUNNING:
                self.blocks.grow(seq, seq.num_tokens)
                batch.decodes.append(seq)
        return len(batch.decodes)

    def _schedule_chunk(self, batch: ScheduledBatch, seq: Sequence, budget: int) -> int:
        """Give ``seq`` the largest prompt chunk that fits the budget and the free blocks."""
        chunk = min(seq.num_pending, budget)
        free_tokens = (len(seq.block_table) + self.blocks.num_free) * self.blocks.block_size - seq.num_computed
        chunk = min(chunk, free_tokens)
        if chunk <= 0:
            return 0
        self.blocks.grow(seq, seq.num_computed + chunk)
        batch.prefills.append((seq, chunk))
        return chunk

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
