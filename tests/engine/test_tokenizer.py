import json

import pytest

from epserve.services.engine.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDecoder, Tokenizer, load_tokenizer

pytestmark = pytest.mark.unit

TEXTS = ["hello world", "héllo wörld", "€uro 价格 🙂", ""]


# ---- byte tokenizer -------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text):
    tok = ByteTokenizer(300)
    ids = tok.encode(text)
    assert ids[0] == 0
    assert ids[1:] == [3 + b for b in text.encode("utf-8")]
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=False) == ids[1:]


def test_byte_decode_skips_specials_and_out_of_range_ids():
    tok = ByteTokenizer(512)
    ids = [0, 3 + ord("a"), 1, 2, 259, 511, 3 + ord("b")]
    assert tok.decode(ids) == "ab"
    assert tok.eos_token_ids == (1,) and tok.bos_token_id == 0 and tok.vocab_size == 512
    assert isinstance(tok, Tokenizer)


def test_byte_decode_replaces_invalid_utf8():
    tok = ByteTokenizer(259)
    euro = "€".encode("utf-8")
    assert tok.decode([3 + euro[0], 3 + euro[1]]) == "\ufffd"


def test_byte_tokenizer_rejects_small_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        ByteTokenizer(258)


# ---- HF tokenizer ---------------------------------------------------------------------------


def _build_hf_dir(tmp_path, config: dict | None):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = RustTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["hello world", "héllo wörld", "the quick brown fox", "€uro"] * 5, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_hf_tokenizer_uses_config_specials(tmp_path):
    model_dir = _build_hf_dir(tmp_path, {"bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": False}})
    tok = HFTokenizer(model_dir, bos_token_id=99, eos_token_ids=[98, 97])
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    for text in ["hello world", "héllo wörld €uro"]:
        ids = tok.encode(text)
        assert ids[0] == 1 and 1 not in ids[1:]
        assert tok.encode(text, add_bos=False) == ids[1:]
        assert tok.decode(ids) == text
        assert tok.decode([*ids, 2, 0]) == text  # specials skipped
    assert tok.vocab_size >= 260


def test_hf_tokenizer_falls_back_to_arguments(tmp_path):
    model_dir = _build_hf_dir(tmp_path, {"bos_token": None, "eos_token": "<not-a-token>"})
    tok = HFTokenizer(model_dir, bos_token_id=None, eos_token_ids=[2, 0])
    assert tok.bos_token_id is None and tok.eos_token_ids == (2, 0)
    assert tok.decode(tok.encode("hello")) == "hello"
    assert tok.encode("hello") == tok.encode("hello", add_bos=False)


def test_load_tokenizer_picks_implementation(tmp_path):
    (tmp_path / "hf").mkdir()
    hf = load_tokenizer(_build_hf_dir(tmp_path / "hf", None), vocab_size=1000, bos_token_id=1, eos_token_ids=[2])
    assert isinstance(hf, HFTokenizer) and hf.bos_token_id == 1 and hf.eos_token_ids == (2,)
    byte = load_tokenizer(tmp_path / "empty", vocab_size=300, bos_token_id=None, eos_token_ids=[1])
    assert isinstance(byte, ByteTokenizer) and byte.vocab_size == 300 and byte.bos_token_id == 0


# ---- incremental decoding -------------------------------------------------------------------


def test_incremental_decoder_holds_split_multibyte_character():
    tok = ByteTokenizer(300)
    euro = [3 + b for b in "€".encode("utf-8")]  # three byte tokens
    decoder = IncrementalDecoder(tok)
    assert decoder.push(tok.encode("a", add_bos=False)) == "a"
    assert decoder.push(euro[:1]) == ""
    assert decoder.push(euro[1:2]) == ""
    assert decoder.push(euro[2:] + tok.encode("b", add_bos=False)) == "€b"
    assert decoder.push([1]) == ""  # EOS decodes to nothing
    assert decoder.flush() == ""


def test_incremental_decoder_concatenation_equals_full_decode():
    tok = ByteTokenizer(300)
    text = "héllo 价格 🙂 wörld"
    ids = tok.encode(text, add_bos=False)
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(ids[i : i + 2]) for i in range(0, len(ids), 2)]
    assert "".join(pieces) + decoder.flush() == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_incremental_decoder_flushes_incomplete_tail():
    tok = ByteTokenizer(300)
    decoder = IncrementalDecoder(tok)
    assert decoder.push([3 + ord("x"), 3 + 0xE2]) == ""
    assert decoder.flush() == "x\ufffd"
    assert decoder.flush() == ""


def test_incremental_decoder_with_hf_byte_level_tokens(tmp_path):
    tok = HFTokenizer(_build_hf_dir(tmp_path, None), bos_token_id=None, eos_token_ids=[2])
    # "€" is bytes E2 82 AC, i.e. the byte-level symbols "â", "Ĥ", "¬": push them one at a time.
    split = [tok._tokenizer.token_to_id(symbol) for symbol in "âĤ¬"]
    assert None not in split and tok.decode(split) == "€"
    decoder = IncrementalDecoder(tok)
    assert [decoder.push([i]) for i in split] == ["", "", "€"]
    # A whole sentence, one token at a time, concatenates back to the full decode.
    ids = tok.encode("hello wörld €uro", add_bos=False)
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push([i]) for i in ids]
    assert "".join(pieces) + decoder.flush() == "hello wörld €uro"
    assert all("\ufffd" not in piece for piece in pieces)


def test_token_bytes_join_back_into_the_text(tmp_path):
    """A token's bytes (the logprobs API's ``bytes``) are its own, even for one byte of a split character."""
    byte_tok = ByteTokenizer(vocab_size=300)
    text = "héllo €"
    ids = byte_tok.encode(text, add_bos=False)
    assert b"".join(byte_tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert byte_tok.token_bytes(byte_tok.encode("€", add_bos=False)[0]) == b"\xe2"
    assert byte_tok.token_bytes(0) == byte_tok.token_bytes(299) == b""          # BOS; beyond the bytes
    hf_tok = HFTokenizer(_build_hf_dir(tmp_path, None), bos_token_id=None, eos_token_ids=[2])
    split = [hf_tok._tokenizer.token_to_id(symbol) for symbol in "âĤ¬"]           # "€": E2 82 AC
    assert [hf_tok.token_bytes(i) for i in split] == [b"\xe2", b"\x82", b"\xac"]
    text = "hello wörld €uro"
    ids = hf_tok.encode(text, add_bos=False)
    assert b"".join(hf_tok.token_bytes(i) for i in ids) == text.encode("utf-8")
