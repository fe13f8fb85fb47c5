"""One request's state inside the engine."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from epserve.services.engine.params import SamplingParams


class Status(Enum):
    WAITING = "waiting"      # not admitted yet, or preempted (its KV was dropped and is recomputed)
    RUNNING = "running"      # owns KV blocks; prefilling in chunks or decoding
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int                                   # resolved per-request seed (params.seed or drawn)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0                       # tokens whose latent KV is in the cache
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None            # "stop" | "length" | "abort"

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
