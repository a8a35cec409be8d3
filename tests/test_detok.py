import pytest

from sampler.runtime.tiny import build_tiny_tokenizer
from server.detok import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def feed(tok, ids, stop=None, chunk=1):
    detok = IncrementalDetokenizer(tok, stop)
    pieces = []
    for i in range(0, len(ids), chunk):
        pieces.append(detok.add(ids[i : i + chunk]))
        if detok.stopped:
            break
    pieces.append(detok.flush())
    return pieces, detok


def test_multibyte_characters_are_never_split(tok):
    text = "東京 🙂 café"
    ids = tok(text)["input_ids"]
    pieces, _ = feed(tok, ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # Byte-level tokens really do split these characters, or the test proves nothing.
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_streamed_text_equals_whole_decode(tok, chunk):
    text = "def fibonacci(n):\n    return n — naïve 日本語"
    ids = tok(text)["input_ids"]
    pieces, _ = feed(tok, ids, chunk=chunk)
    assert "".join(pieces) == tok.decode(ids)


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_stop_string_never_leaks_even_across_chunks(tok, chunk):
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok(text)["input_ids"]
    pieces, detok = feed(tok, ids, stop=["fox jumps"], chunk=chunk)
    assert "".join(pieces) == "The quick brown "
    assert detok.stopped
    # No prefix of the stop string was shown before it was known not to be one.
    assert all("fox" not in p for p in pieces)


def test_partial_stop_prefix_is_released_when_it_diverges(tok):
    ids = tok("fox jumped high")["input_ids"]
    pieces, detok = feed(tok, ids, stop=["fox jumps"])
    assert not detok.stopped
    assert "".join(pieces) == "fox jumped high"


def test_earliest_of_several_stops_wins(tok):
    ids = tok("1. first item\n2. second item")["input_ids"]
    pieces, detok = feed(tok, ids, stop=["second", "\n"])
    assert "".join(pieces) == "1. first item"
    # Tokens counted stop at the one that completed the stop string.
    assert detok.num_tokens <= len(ids)


def test_long_multibyte_output_equals_whole_decode(tok):
    text = "東京 🙂 café — naïve 日本語; def f(x): return x ** 2\n" * 40
    ids = tok(text)["input_ids"]
    assert len(ids) > 500
    for chunk in (1, 4):
        pieces, _ = feed(tok, ids, chunk=chunk)
        assert "".join(pieces) == tok.decode(ids)


class _RecordingTokenizer:
    """Wraps a tokenizer and remembers the longest id list it was asked to decode."""

    def __init__(self, tok):
        self._tok = tok
        self.longest = 0

    def decode(self, ids, **kwargs):
        self.longest = max(self.longest, len(ids))
        return self._tok.decode(ids, **kwargs)


def test_each_step_decodes_a_short_window_not_the_whole_output(tok):
    ids = tok("naïve café 🙂 " * 100)["input_ids"]
    recording = _RecordingTokenizer(tok)
    pieces, _ = feed(recording, ids)
    assert "".join(pieces) == tok.decode(ids)
    # A window spans the last read tokens plus the unread ones (an incomplete character's bytes).
    assert recording.longest <= 8, recording.longest
