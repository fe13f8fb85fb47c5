"""Tokenizers of the engine and an incremental decoder for streaming.

``ByteTokenizer`` serves the built-in tiny model (UTF-8 bytes shifted past three reserved ids);
``HFTokenizer`` wraps a checkpoint's ``tokenizer.json`` through the ``tokenizers`` package (local
files only, never a download). ``load_tokenizer`` picks one for a model directory.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

REPLACEMENT_CHAR = "\ufffd"


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes ``token_id`` stands for (a part of a UTF-8 character for a split one); b"" for none."""
        ...


class ByteTokenizer:
    """Byte-level tokenizer: 0=BOS, 1=EOS, 2=PAD, byte b -> id 3 + b; ids >= 259 decode to nothing."""

    NUM_RESERVED = 3
    PAD_TOKEN_ID = 2
    MIN_VOCAB_SIZE = NUM_RESERVED + 256

    def __init__(self, vocab_size: int, bos_token_id: int = 0, eos_token_id: int = 1):
        if vocab_size < self.MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size: must be >= {self.MIN_VOCAB_SIZE} for byte tokens, got {vocab_size}")
        for name, token in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
            if not 0 <= token < vocab_size:
                raise ValueError(f"{name}: must be in [0, {vocab_size}), got {token}")
        self.vocab_size = vocab_size
        self.bos_token_id: int | None = bos_token_id
        self.eos_token_ids: tuple[int, ...] = (eos_token_id,)
        self._special = frozenset(range(self.NUM_RESERVED)) | {bos_token_id, eos_token_id}

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [self.NUM_RESERVED + b for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(
            i - self.NUM_RESERVED
            for i in ids
            if self.NUM_RESERVED <= i < self.MIN_VOCAB_SIZE and i not in self._special
        )
        return data.decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        special = token_id in self._special or not self.NUM_RESERVED <= token_id < self.MIN_VOCAB_SIZE
        return b"" if special else bytes([token_id - self.NUM_RESERVED])


class HFTokenizer:
    """A ``tokenizer.json`` tokenizer; bos/eos from ``tokenizer_config.json`` win over the arguments."""

    def __init__(self, model_dir: str | Path, bos_token_id: int | None, eos_token_ids: Sequence[int]):
        from tokenizers import Tokenizer as _RustTokenizer

        model_dir = Path(model_dir)
        self._tokenizer = _RustTokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.vocab_size: int = self._tokenizer.get_vocab_size(with_added_tokens=True)
        config = _read_tokenizer_config(model_dir)
        config_bos = self._config_token_id(config.get("bos_token"))
        config_eos = self._config_token_id(config.get("eos_token"))
        self.bos_token_id: int | None = config_bos if config_bos is not None else bos_token_id
        self.eos_token_ids: tuple[int, ...] = (config_eos,) if config_eos is not None else tuple(eos_token_ids)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_bos and self.bos_token_id is not None else list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        """Byte-level BPE symbols (GPT-2's byte alphabet, as DeepSeek's tokenizer) map back to their bytes, a
        byte-fallback token ``<0xNN>`` to its byte; any other token is its decoded text's UTF-8."""
        token = self._tokenizer.id_to_token(token_id)
        if token is None:
            return b""
        if all(char in _BYTE_OF_SYMBOL for char in token):
            return bytes(_BYTE_OF_SYMBOL[char] for char in token)
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            return bytes([int(token[3:5], 16)])
        return self.decode([token_id]).encode("utf-8")

    def _config_token_id(self, entry) -> int | None:
        """Id of a tokenizer_config token entry: a string or {"content": ...}; None if absent/unknown."""
        if isinstance(entry, dict):
            entry = entry.get("content")
        if not isinstance(entry, str):
            return None
        return self._tokenizer.token_to_id(entry)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, symbol -> byte: printable bytes stand for themselves, the others for
    chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


_BYTE_OF_SYMBOL = _byte_level_alphabet()


def load_tokenizer(
    model_dir: str | Path | None, *, vocab_size: int, bos_token_id: int | None, eos_token_ids: Sequence[int]
) -> Tokenizer:
    """HFTokenizer when ``model_dir/tokenizer.json`` exists, else a ByteTokenizer of ``vocab_size``.

    The byte tokenizer keeps its reserved defaults (BOS 0, EOS 1) where no id is given and uses the
    first of ``eos_token_ids``.
    """
    if model_dir is not None and (Path(model_dir) / "tokenizer.json").is_file():
        return HFTokenizer(model_dir, bos_token_id, eos_token_ids)
    return ByteTokenizer(
        vocab_size,
        bos_token_id=0 if bos_token_id is None else bos_token_id,
        eos_token_id=eos_token_ids[0] if eos_token_ids else 1,
    )


class IncrementalDecoder:
    """Turns a growing list of generated ids into text deltas for streaming.

    Decodes a small window of ids (from the previous emission's start, for context such as leading
    spaces) and emits only text past what was already emitted. Text ending in U+FFFD (an incomplete
    UTF-8 sequence, e.g. a multi-byte character split across byte tokens) is held back until it
    completes or ``flush`` is called.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: ids before it are never decoded again
        self._read_offset = 0  # ids before it have been emitted

    def push(self, new_ids: Sequence[int]) -> str:
        """Add generated ids; return the newly completed text (may be empty)."""
        self._ids.extend(new_ids)
        prefix_text, text = self._decode_window()
        if len(text) <= len(prefix_text) or text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._advance(text[len(prefix_text) :])

    def flush(self) -> str:
        """Return whatever text is still held back (at the end of the stream)."""
        prefix_text, text = self._decode_window()
        return self._advance(text[len(prefix_text) :])

    def _decode_window(self) -> tuple[str, str]:
        window = self._ids[self._prefix_offset :]
        emitted = self._read_offset - self._prefix_offset
        return self._tokenizer.decode(window[:emitted]), self._tokenizer.decode(window)

    def _advance(self, delta: str) -> str:
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return delta


def _read_tokenizer_config(model_dir: Path) -> dict:
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        return json.load(f)
