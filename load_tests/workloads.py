"""What to send: lists of :class:`RequestSpec` built from a seed, never downloaded.

- ``random``: prompts of random token ids, input and output lengths drawn from a :class:`LengthDist`.
- ``prefix``: ``groups`` random prefixes of ``prefix_len`` tokens shared by the prompts of a group, each
  followed by its own random suffix (input-length distribution); groups interleaved at random.
- ``sharegpt``: a ShareGPT-format JSON file (``[{"conversations": [{"from": "human", "value": ...},
  {"from": "gpt", "value": ...}, ...]}, ...]``): the first turn is the prompt (text), the length of the
  second turn is the output length, as ``vllm bench serve`` does. :func:`make_sharegpt` writes such a
  file from a seed, so the path can be exercised without downloading anything.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FIRST_TOKEN_ID = 3      # random prompts start here: 0-2 are BOS, EOS, PAD in the tiny model (BOS, EOS in DeepSeek-V3)
_DIST_ARITY = {"fixed": 1, "uniform": 2, "normal": 2, "lognormal": 2}


@dataclass(frozen=True)
class RequestSpec:
    prompt: list[int] | str   # token ids (sent as given) or text (tokenised by the server)
    prompt_len: int           # tokens, as counted by the workload; the server's usage count wins when reported
    output_len: int           # max_tokens asked for


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution, written ``N``, ``uniform:LO:HI``, ``normal:MEAN:STD`` or
    ``lognormal:MEDIAN:SIGMA``; samples are rounded and clipped to at least 1."""

    kind: str
    params: tuple[float, ...]

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        kind, *values = text.split(":") if ":" in text else ("fixed", text)
        if kind not in _DIST_ARITY or len(values) != _DIST_ARITY[kind]:
            raise ValueError(f"length distribution {text!r}: use N, uniform:LO:HI, normal:MEAN:STD or "
                             "lognormal:MEDIAN:SIGMA")
        try:
            params = tuple(float(v) for v in values)
        except ValueError:
            raise ValueError(f"length distribution {text!r}: parameters must be numbers") from None
        if params[0] < 1 or (kind == "uniform" and params[1] < params[0]) or (kind != "uniform" and min(params) < 0):
            raise ValueError(f"length distribution {text!r}: lengths must be >= 1 and spreads >= 0")
        return cls(kind, params)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        a, *rest = self.params
        if self.kind == "fixed":
            values = np.full(n, a)
        elif self.kind == "uniform":
            values = rng.integers(int(a), int(rest[0]) + 1, n)
        elif self.kind == "normal":
            values = rng.normal(a, rest[0], n)
        else:
            values = a * np.exp(rng.normal(0.0, rest[0], n))
        return np.maximum(1, np.rint(values)).astype(int)

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"{self.params[0]:g}"
        return ":".join([self.kind, *(f"{p:g}" for p in self.params)])


def random_requests(n: int, input_len: LengthDist, output_len: LengthDist, token_range: tuple[int, int],
                    rng: np.random.Generator) -> list[RequestSpec]:
    """``n`` prompts of uniformly random token ids in ``[lo, hi)``."""
    lo, hi = token_range
    ins, outs = input_len.sample(rng, n), output_len.sample(rng, n)
    return [RequestSpec(rng.integers(lo, hi, int(i)).tolist(), int(i), int(o)) for i, o in zip(ins, outs)]


def prefix_requests(n: int, groups: int, prefix_len: int, suffix_len: LengthDist, output_len: LengthDist,
                    token_range: tuple[int, int], rng: np.random.Generator) -> list[RequestSpec]:
    """``n`` prompts in ``groups`` groups; a group's prompts start with the same ``prefix_len`` tokens."""
    lo, hi = token_range
    prefixes = [rng.integers(lo, hi, prefix_len).tolist() for _ in range(groups)]
    group_of = rng.permutation(np.arange(n) % groups)
    suffixes, outs = suffix_len.sample(rng, n), output_len.sample(rng, n)
    specs = []
    for g, s, o in zip(group_of, suffixes, outs):
        prompt = prefixes[g] + rng.integers(lo, hi, int(s)).tolist()
        specs.append(RequestSpec(prompt, len(prompt), int(o)))
    return specs


def token_counter(tokenizer: str) -> Callable[[str], int]:
    """Counts a text's tokens: ``bytes`` (UTF-8 bytes, the built-in tiny model's tokenizer) or a
    ``tokenizer.json`` file or a directory holding one (read with the ``tokenizers`` package)."""
    if tokenizer == "bytes":
        return lambda text: len(text.encode("utf-8"))
    from tokenizers import Tokenizer

    path = Path(tokenizer)
    loaded = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
    return lambda text: len(loaded.encode(text, add_special_tokens=False).ids)


def sharegpt_requests(path: str | Path, n: int, count_tokens: Callable[[str], int], max_len: int,
                      output_len: LengthDist | None, rng: np.random.Generator) -> list[RequestSpec]:
    """``n`` requests from a ShareGPT file, drawn at random (repeating when it has fewer than ``n``).

    Pairs with a prompt or reply under 4 tokens, or longer than ``max_len`` together, are skipped (as
    vLLM does); ``output_len`` replaces the reply's length when given.
    """
    pairs = []
    for entry in json.loads(Path(path).read_text()):
        turns = entry.get("conversations") or []
        if len(turns) < 2:
            continue
        prompt, reply = turns[0]["value"], turns[1]["value"]
        prompt_len, reply_len = count_tokens(prompt), count_tokens(reply)
        if prompt_len >= 4 and reply_len >= 4 and prompt_len + reply_len <= max_len:
            pairs.append((prompt, prompt_len, reply_len))
    if not pairs:
        raise ValueError(f"{path}: no usable conversation (2+ turns, 4+ tokens each, at most {max_len} together)")
    order = np.concatenate([rng.permutation(len(pairs)) for _ in range(-(-n // len(pairs)))])[:n]
    outs = output_len.sample(rng, n) if output_len else [pairs[i][2] for i in order]
    return [RequestSpec(pairs[i][0], pairs[i][1], int(o)) for i, o in zip(order, outs)]


_WORDS = ("the a of to and in that is for it on with as was at by an be this from or have not are but one "
          "model token expert cache layer router shard request stream latency batch prompt reply decode "
          "prefill queue replica memory attention throughput kernel weight vector matrix gradient value "
          "question answer explain write list compare describe summarise why how what when where which").split()


def _sentence(rng: np.random.Generator, median_words: float) -> str:
    words = rng.choice(_WORDS, max(2, int(median_words * np.exp(rng.normal(0, 0.6)))))
    return " ".join(words).capitalize() + "."


def make_sharegpt(n: int, seed: int) -> list[dict]:
    """``n`` synthetic conversations in ShareGPT format (2 to 6 turns; replies longer than questions)."""
    rng = np.random.default_rng(seed)
    conversations = []
    for i in range(n):
        turns = []
        for t in range(2 * int(rng.integers(1, 4))):
            speaker, words = ("human", 12) if t % 2 == 0 else ("gpt", 40)
            text = " ".join(_sentence(rng, words) for _ in range(int(rng.integers(1, 4))))
            turns.append({"from": speaker, "value": text})
        conversations.append({"id": f"synthetic-{seed}-{i}", "conversations": turns})
    return conversations
