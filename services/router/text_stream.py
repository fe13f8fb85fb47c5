"""A request's generated tokens as the text its client receives: decoded incrementally, stop strings applied.

The router's ``Generate`` (and so the HTTP API, which runs through it) streams every token through
one ``TextStream``: ``IncrementalDecoder`` holds back incomplete UTF-8, ``chat.StopMatcher`` holds
back what may be the start of a stop string and ends the text before the first one. The tokens kept
are those up to the one that completes the stop string (it is in the tokens, not in the text, as
vLLM does). A resumed request primes a new stream with the tokens its client already received,
which holds back what the first stream held back.
"""
from __future__ import annotations

from typing import Sequence

from epserve.services.engine.tokenizer import IncrementalDecoder, Tokenizer
from epserve.services.router.chat import StopMatcher


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()):
        self._decoder = IncrementalDecoder(tokenizer)
        self._stops = StopMatcher(stops)
        self.text = ""                     # every character emitted so far

    @property
    def stopped(self) -> bool:
        """A stop string ended the text: nothing more is emitted."""
        return self._stops.stopped

    def push(self, token_ids: Sequence[int]) -> tuple[int, str]:
        """-> (how many of ``token_ids`` the generation keeps, the text now safe to emit).

        All are kept unless one completes a stop string; those after it are dropped. Without stop
        strings the ids are decoded together, else one at a time (to find the one that completes it).
        """
        if self.stopped:
            return 0, ""
        if not self._stops.stops:
            return len(token_ids), self._emit(self._decoder.push(token_ids))
        text = ""
        for kept, token in enumerate(token_ids, 1):
            text += self._stops.push(self._decoder.push([token]))
            if self.stopped:
                return kept, self._emit(text)
        return len(token_ids), self._emit(text)

    def finish(self) -> str:
        """The text held back, at the end of a generation (it may still complete a stop string)."""
        text = self._stops.push(self._decoder.flush())
        return self._emit(text + self._stops.flush())

    def _emit(self, text: str) -> str:
        self.text += text
        return text
