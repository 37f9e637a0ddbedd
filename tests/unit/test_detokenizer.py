"""Incremental detokenization: streamed deltas equal the full decode for every split; stop strings."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.tools.tiny_tokenizer import IM_END, IM_START, build_tiny_sentencepiece_tokenizer, build_tiny_tokenizer

TEXTS = [
    "Hello, world! How are you today?",
    "東京タワーは高い。中文字符和日本語が混ざっています。",
    "emoji 😀🎉👩‍👩‍👧 and flags 🇯🇵 in a row😀😀",
    "Größe, naïve café, crème brûlée, Ελληνικά, русский текст.",
    "def f(x):\n    if x:\n\t\treturn  x  *  2\n\n\n    return None   \n",
    "  leading spaces and trailing   ",
    "a",
]


@pytest.fixture(scope="module")
def toks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tokenizer]:
    root = tmp_path_factory.mktemp("detok")
    build_tiny_tokenizer(root / "bytelevel")
    build_tiny_sentencepiece_tokenizer(root / "sp")
    return {name: Tokenizer.from_pretrained(root / name) for name in ("bytelevel", "sp")}


def _random_splits(ids: list[int], rng: random.Random) -> list[list[int]]:
    chunks, i = [], 0
    while i < len(ids):
        n = rng.choice([1, 1, 1, 2, 3, 5, 8])
        chunks.append(ids[i:i + n])
        i += n
    return chunks


def _stream(tok: Tokenizer, chunks: list[list[int]], **kw) -> tuple[IncrementalDetokenizer, list[str]]:
    detok = IncrementalDetokenizer(tok, [1, 2, 3], **kw)
    deltas = [detok.update(chunk) for chunk in chunks]
    deltas.append(detok.flush())
    return detok, deltas


@pytest.mark.parametrize("name", ["bytelevel", "sp"])
@pytest.mark.parametrize("skip", [True, False])
def test_deltas_equal_full_decode_for_any_split(toks, name: str, skip: bool) -> None:
    tok = toks[name]
    rng = random.Random(1)
    for text in TEXTS:
        ids = tok.encode(text)  # includes BOS for the sentencepiece tokenizer
        expected = tok.decode(ids, skip_special_tokens=skip)
        for _ in range(25):
            detok, deltas = _stream(tok, _random_splits(ids, rng), skip_special_tokens=skip)
            assert "".join(deltas) == expected == detok.output_text
            assert not any("\ufffd" in d for d in deltas), deltas  # never a partial character
            if name == "bytelevel":  # valid text is released without waiting for flush; byte-fallback
                assert deltas[-1] == ""  # tokenizers hold a trailing <0xNN> run until it ends


@pytest.mark.parametrize("name", ["bytelevel", "sp"])
def test_one_token_at_a_time_streams_promptly(toks, name: str) -> None:
    tok = toks[name]
    ids = tok.encode("Hello 東京 world 😀 done", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    deltas = [detok.update([i]) for i in ids]
    assert "".join(deltas) == tok.decode(ids)
    assert any(d.startswith("東") or d.startswith(" 東") for d in deltas)  # the whole char at once
    assert deltas[0] == "Hello"  # decode(output ids) strips sentencepiece's leading space, like transformers


@pytest.mark.parametrize("name", ["bytelevel", "sp"])
def test_random_ids_including_invalid_bytes_and_specials(toks, name: str) -> None:
    tok = toks[name]
    rng = random.Random(2)
    for _ in range(150):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            detok, deltas = _stream(tok, _random_splits(ids, rng), skip_special_tokens=skip)
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


def test_byte_fallback_chars_split_across_tokens(toks) -> None:
    tok = toks["sp"]
    ids = tok.encode("x 😀東é€ y", add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(ids)
    assert sum(p.startswith("<0x") for p in pieces) >= 7  # emoji and CJK fall back to bytes
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.update([i]) for i in ids] + [detok.flush()]
    assert "".join(deltas) == "x 😀東é€ y"
    assert all("\ufffd" not in d for d in deltas)


def test_skip_special_tokens(toks) -> None:
    tok = toks["bytelevel"]
    im_start, im_end = tok.token_to_id(IM_START), tok.token_to_id(IM_END)
    ids = [im_start] + tok.encode("assistant\nHi 東京", add_special_tokens=False) + [im_end]
    _, on = _stream(tok, [[i] for i in ids], skip_special_tokens=True)
    _, off = _stream(tok, [[i] for i in ids], skip_special_tokens=False)
    assert "".join(on) == "assistant\nHi 東京"
    assert "".join(off) == f"{IM_START}assistant\nHi 東京{IM_END}" == tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("name", ["bytelevel", "sp"])
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(toks, name: str, include: bool) -> None:
    tok = toks[name]
    text = "Hello world, the end is 東京😀 here. More text after"
    ids = tok.encode(text, add_special_tokens=False)
    rng = random.Random(3)
    for stop in ["the end", "東京😀", "re. M"]:
        cut = text.index(stop)
        expected = text[: cut + (len(stop) if include else 0)]
        for _ in range(20):
            detok = IncrementalDetokenizer(tok, [], stop=[stop, "never-there"], include_stop_str_in_output=include)
            streamed = ""
            for chunk in _random_splits(ids, rng):
                streamed += detok.update(chunk)
                assert expected.startswith(streamed)  # nothing past the stop is ever streamed
            assert detok.stop_reason == stop
            assert streamed == expected == detok.output_text
            assert detok.update(ids[:3]) == "" and detok.flush() == ""


def test_first_completed_stop_wins_independent_of_split(toks) -> None:
    tok = toks["bytelevel"]
    text = "xx abcd yy"
    ids = tok.encode(text, add_special_tokens=False)
    for stops, reason, out in [(["abcd", "bc"], "bc", "xx a"), (["cd", "abc"], "abc", "xx "),
                               (["b", "ab"], "ab", "xx ")]:
        for split in ([[i] for i in ids], [ids]):
            detok = IncrementalDetokenizer(tok, [], stop=stops)
            streamed = "".join(detok.update(c) for c in split)
            assert (detok.stop_reason, streamed) == (reason, out)


def test_flush_releases_text_held_for_a_possible_stop(toks) -> None:
    tok = toks["bytelevel"]
    ids = tok.encode("Pack my box, the e", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["the end"])
    streamed = "".join(detok.update([i]) for i in ids)
    assert streamed == "Pack my box, "  # "the e" could still become the stop string
    assert detok.flush() == "the e"
    assert detok.stop_reason is None and detok.output_text == "Pack my box, the e"


def test_work_per_update_is_bounded(toks) -> None:
    tok = toks["sp"]
    ids = tok.encode("東京 😀 the quick brown fox " * 80, add_special_tokens=False)
    windows: list[int] = []
    real_decode = tok.decode

    def counting_decode(x, skip_special_tokens=True):
        windows.append(len(x))
        return real_decode(x, skip_special_tokens=skip_special_tokens)

    tok.decode = counting_decode  # type: ignore[method-assign]
    try:
        detok = IncrementalDetokenizer(tok, [], stop=["zebra"])
        text = "".join(detok.update([i]) for i in ids) + detok.flush()
    finally:
        del tok.decode
    assert text == real_decode(ids)
    assert len(ids) > 1000 and max(windows) <= 12  # windows stay small: O(new tokens) per update
