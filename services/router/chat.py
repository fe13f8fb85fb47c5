"""What the OpenAI-compatible API needs besides generation: chat templates and stop strings (no torch).

- ``ChatTemplate``: the checkpoint's ``chat_template`` from ``tokenizer_config.json`` (a string, or
  a list of named templates: "default" is taken), rendered as transformers renders it (Jinja2 in an
  immutable sandbox, ``trim_blocks`` and ``lstrip_blocks``, with ``messages``, ``bos_token``,
  ``eos_token`` and ``add_generation_prompt``); a checkpoint without one (the built-in model) gets
  ``DEFAULT_TEMPLATE``.
- ``StopMatcher``: stop strings matched across token boundaries on the streamed text; text that may
  be the start of a stop string is held back until it is known not to be.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

DEFAULT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", own: bool = True):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise
        self.template = environment.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.own = own                  # the checkpoint's (it writes its BOS itself) or the built-in default

    @classmethod
    def for_checkpoint(cls, model_dir: str | Path | None) -> "ChatTemplate":
        config = _tokenizer_config(model_dir)
        source = config.get("chat_template")
        if isinstance(source, list):
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        if not source:
            return cls(DEFAULT_TEMPLATE, own=False)
        return cls(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))

    def render(self, messages: Sequence[dict]) -> str:
        """The prompt text for ``messages`` (each with "role" and "content"), ending in the assistant's turn."""
        return self.template.render(messages=list(messages), bos_token=self.bos_token, eos_token=self.eos_token,
                                    add_generation_prompt=True)


def _raise(message: str):
    raise ValueError(message)


def _tokenizer_config(model_dir: str | Path | None) -> dict:
    path = Path(model_dir) / "tokenizer_config.json" if model_dir else None
    if path is None or not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def _token_text(entry) -> str:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(entry, dict):
        return entry.get("content", "")
    return entry or ""


class StopMatcher:
    """Feed text deltas; get what may be emitted, and whether a stop string ended the text."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._held = ""                  # text not emitted yet: it may be where a stop string starts
        self.stopped = False

    def push(self, delta: str) -> str:
        """The text now safe to emit (up to a stop string, which is never emitted)."""
        if self.stopped:
            return ""
        text = self._held + delta
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[:min(hits)]
        keep = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """What is held back, at the end of a generation no stop string ended."""
        held, self._held = ("" if self.stopped else self._held), ""
        return held
