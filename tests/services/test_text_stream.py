"""The router's TextStream: incremental decoding with stop strings, which keeps the tokens up to the match."""
import pytest

from epserve.services.engine.tokenizer import ByteTokenizer
from epserve.services.router.text_stream import TextStream

pytestmark = pytest.mark.unit

TOKENIZER = ByteTokenizer(512)


def ids(text: str) -> list[int]:
    return TOKENIZER.encode(text, add_bos=False)


def test_without_stops_everything_is_kept_and_decoded():
    stream = TextStream(TOKENIZER)
    assert stream.push(ids("hello ")) == (6, "hello ")
    assert stream.push(ids("world")) == (5, "world")
    assert (stream.finish(), stream.stopped, stream.text) == ("", False, "hello world")


def test_a_stop_string_across_pushes_keeps_the_token_that_completes_it_and_drops_the_rest():
    stream = TextStream(TOKENIZER, ["lo w", "never"])
    assert stream.push(ids("Hel")) == (3, "He")                   # "l" held: it may start "lo w"
    assert stream.push(ids("lo")) == (2, "l")
    assert stream.push(ids(" world")) == (2, "")                  # " w" completes it; "orld" is dropped
    assert stream.stopped and stream.text == "Hel"
    assert stream.push(ids("more")) == (0, "") and stream.finish() == ""


def test_held_text_that_is_no_stop_is_released_at_the_end():
    stream = TextStream(TOKENIZER, ["END"])
    assert stream.push(ids("the EN")) == (6, "the ")
    assert (stream.finish(), stream.stopped, stream.text) == ("EN", False, "the EN")


def test_incomplete_utf8_is_held_until_it_completes():
    stream = TextStream(TOKENIZER, ["x"])
    euro = ids("€")                                               # three byte tokens
    assert stream.push(euro[:2]) == (2, "")
    assert stream.push(euro[2:]) == (1, "€")


def test_a_primed_stream_holds_back_what_the_first_held_back():
    """A resumed request primes a new stream with the tokens its client had: the rest comes out alike."""
    first = TextStream(TOKENIZER, ["stop!"])
    seen, rest = ids("say sto"), ids("p! and more")
    sent = first.push(seen)[1]
    resumed = TextStream(TOKENIZER, ["stop!"])
    resumed.push(seen)
    assert sent == "say " and resumed.push(rest) == (2, "") and resumed.stopped and resumed.text == "say "
