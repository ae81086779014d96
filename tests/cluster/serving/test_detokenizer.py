"""Incremental detokenization on a byte-level BPE (multi-byte characters split across tokens)
and stop strings matched on the text."""
from __future__ import annotations

import pytest

from testkit.tiny_tokenizer import make_tiny_tokenizer

from pagedray.cluster.serving.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, my name is Ada and I like paged attention.",
    "日本語のテキスト, naïve café",          # 3-byte characters, each split over byte tokens
    "emoji 🙂🚀 and 漢字 € ünïcödé",        # 4-byte characters too
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"), 320)


def _stream(tok, prompt: str, ids: list[int], **kw) -> tuple[IncrementalDetokenizer, list[str]]:
    detok = IncrementalDetokenizer(tok, tok.encode(prompt), **kw)
    deltas = [detok.add_tokens([t], final=i == len(ids) - 1) for i, t in enumerate(ids)]
    return detok, deltas


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_equals_full_decode_and_never_shows_broken_bytes(tok, text):
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids) or text.isascii()
    detok, deltas = _stream(tok, "The capital of France is", ids)
    assert "".join(deltas) == detok.text == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_word_spacing_after_the_prompt(tok):
    ids = tok.encode(" Paris. The capital")
    detok, deltas = _stream(tok, "The capital of France is", ids)
    assert detok.text == " Paris. The capital"


def test_incomplete_bytes_are_held_then_flushed_at_the_end(tok):
    first_byte = tok.encode("漢")[0]
    detok = IncrementalDetokenizer(tok, tok.encode("Hi"))
    assert detok.add_tokens([first_byte]) == "" and detok.text == ""
    assert detok.add_tokens([first_byte], final=True) == "\ufffd\ufffd"


def test_stop_string_spanning_tokens_is_cut_and_ends_decoding(tok):
    text = "Hello, my name is Ada and I like paged attention."
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, tok.encode("Hi"), stop=["name is"])
    for i, t in enumerate(ids):
        detok.add_tokens([t])
        if detok.stopped_on is not None:
            break
    # It stops at the first token whose text completes the stop string, not later.
    assert "name is" in tok.decode(ids[:i + 1]) and "name is" not in tok.decode(ids[:i])
    assert detok.stopped_on == "name is" and detok.text == "Hello, my "
    assert detok.add_tokens(ids[i + 1:]) == "" and detok.text == "Hello, my "


def test_multibyte_stop_string(tok):
    text = "emoji 🙂🚀 and 漢字 € ünïcödé"
    detok, deltas = _stream(tok, "Hi", tok.encode(text), stop=["🚀 and 漢", "zzz"])
    assert detok.stopped_on == "🚀 and 漢" and detok.text == "emoji 🙂"
    assert "".join(deltas) == "emoji 🙂"


def test_earliest_stop_string_wins(tok):
    detok, _ = _stream(tok, "Hi", tok.encode("Once upon a time there was"), stop=["there", "upon"])
    assert detok.stopped_on == "upon" and detok.text == "Once "


def test_stop_string_at_the_very_start(tok):
    detok, deltas = _stream(tok, "Hi", tok.encode("Hello world"), stop=["Hel"])
    assert detok.text == "" and "".join(deltas) == ""


def test_visible_text_holds_back_a_possible_stop_prefix(tok):
    detok = IncrementalDetokenizer(tok, tok.encode("Hi"), stop=["STOP!"])
    for t in tok.encode("abc ST"):
        detok.add_tokens([t])
    assert detok.text == "abc ST"
    assert detok.visible_text(finished=False) == "ab"      # len("STOP!") - 1 chars held back
    assert detok.visible_text(finished=True) == "abc ST"


def test_skip_special_tokens(tok):
    ids = tok.encode("Hello") + [tok.eos_token_id]
    assert _stream(tok, "Hi", ids)[0].text == "Hello"
    assert _stream(tok, "Hi", ids, skip_special_tokens=False)[0].text == "Hello</s>"


def test_no_tokenizer_gives_no_text():
    detok = IncrementalDetokenizer(None, [1, 2, 3], stop=["x"])
    assert detok.add_tokens([4, 5], final=True) == "" and detok.text == ""


@pytest.mark.parametrize("text", TEXTS)
def test_deferred_tokens_decode_to_the_streamed_text(tok, text):
    """`defer` + `flush` (what the output processor does for a completion without stop strings
    until its text is read): the same text as one add_tokens per token, flushed in any chunks."""
    ids = tok.encode(text)
    streamed, deltas = _stream(tok, "Say:", ids)
    detok = IncrementalDetokenizer(tok, tok.encode("Say:"))
    assert detok.can_defer and not IncrementalDetokenizer(tok, [], stop=["x"]).can_defer
    assert not IncrementalDetokenizer(None, []).can_defer
    shown = []
    for i, t in enumerate(ids):
        detok.defer([t], final=i == len(ids) - 1)
        if i % 5 == 4:
            shown.append(detok.flush())
    shown.append(detok.flush())
    assert "".join(shown) == "".join(deltas) == streamed.text == detok.text == text
    assert "\ufffd" not in "".join(shown)
    assert detok.flush() == ""
