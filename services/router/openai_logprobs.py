"""A choice's ``logprobs`` in OpenAI's shapes, from the ``TokenLogprobs`` of the generated tokens (no torch).

- chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}``
- completions (legacy): ``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}``,
  ``text_offset`` counting characters of the completion text (of the tokens' own texts) from 0.

A token's text is its id decoded alone (a byte of a split UTF-8 character decodes to U+FFFD); its ``bytes``
are the token's own (``Tokenizer.token_bytes``), which a client joins back into the text.
Streamed, each chunk's tokens are formatted as they come; offsets go on from the previous chunk's.
"""
from __future__ import annotations

from typing import Sequence

from epserve.services.engine.tokenizer import Tokenizer


class LogprobsFormat:
    def __init__(self, tokenizer: Tokenizer, chat: bool):
        self.tokenizer, self.chat = tokenizer, chat
        self.offset = 0                       # legacy text_offset of the next token

    def format(self, token_ids: Sequence[int], logprobs: Sequence) -> dict:
        """``logprobs``: one ``generation_pb2.TokenLogprobs`` per id of ``token_ids``."""
        if self.chat:
            return {"content": [self._chat_entry(t, lp) for t, lp in zip(token_ids, logprobs)]}
        tokens = [self._text(t) for t in token_ids]
        offsets = []
        for token in tokens:
            offsets.append(self.offset)
            self.offset += len(token)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [self._legacy_top(lp) for lp in logprobs], "text_offset": offsets}

    def _legacy_top(self, logprobs) -> dict[str, float]:
        """{token text: logprob}; tokens of the same text keep the most probable one's."""
        top: dict[str, float] = {}
        for token_id, logprob in zip(logprobs.top_token_ids, logprobs.top_logprobs):
            top.setdefault(self._text(token_id), logprob)
        return top

    def _chat_entry(self, token_id: int, logprobs) -> dict:
        top = [self._chat_token(t, v) for t, v in zip(logprobs.top_token_ids, logprobs.top_logprobs)]
        return {**self._chat_token(token_id, logprobs.logprob), "top_logprobs": top}

    def _chat_token(self, token_id: int, logprob: float) -> dict:
        return {"token": self._text(token_id), "logprob": logprob,
                "bytes": list(self.tokenizer.token_bytes(token_id))}

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])
