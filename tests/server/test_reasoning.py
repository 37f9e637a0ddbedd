"""The <think> parser: final texts, every split of a stream, prompts that open the section, token helpers."""

from __future__ import annotations

import random

import pytest

from tokenmill.config import ThinkingConfig
from tokenmill.engine.thinking import prompt_opens_thinking, thinking_tokens
from tokenmill.server.reasoning import (
    ReasoningTokenCounter,
    StreamingReasoningParser,
    count_reasoning_tokens,
    parse_reasoning,
)

CFG = ThinkingConfig()


@pytest.mark.parametrize(
    ("text", "starts_in", "expected"),
    [
        ("<think>plan it</think>The answer.", False, ("plan it", "The answer.")),
        ("\n<think>a</think>b", False, ("a", "\nb")),
        ("just an answer", False, ("", "just an answer")),
        ("thinking on</think>answer", True, ("thinking on", "answer")),
        ("still thinking when cut", True, ("still thinking when cut", "")),
        ("Hi <think>x</think>", False, ("", "Hi <think>x</think>")),  # a tag after the answer began is text
        ("<think>a</think>b</think>c", False, ("a", "b</think>c")),  # the section closes once
        ("<think>unfinished <thi", False, ("unfinished <thi", "")),
    ],
)
def test_final_text_split(text, starts_in, expected):
    assert parse_reasoning(text, CFG, starts_in) == expected


def test_every_random_split_of_a_stream_gives_the_final_split():
    rng = random.Random(0)
    texts = ["<think>step 1, step 2 </think> answer <b>", "</think>x", "<think></think>", "a<think>b</think>",
             "<th<think>in</thin</think>k>"]
    for text in texts:
        for starts_in in (False, True):
            expected = parse_reasoning(text, CFG, starts_in)
            for _ in range(50):
                cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text))))
                pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
                parser = StreamingReasoningParser(CFG, starts_in)
                reasoning, content = "", ""
                for piece in pieces:
                    r, c = parser.feed(piece)
                    reasoning, content = reasoning + r, content + c
                r, c = parser.finish()
                assert (reasoning + r, content + c) == expected, (text, pieces)


def test_custom_tags_and_dropped_specials():
    cfg = ThinkingConfig(start="[T]", end="[/T]")
    assert parse_reasoning("[T]why<|x|>[/T]so<|x|>", cfg, drop=["<|x|>"]) == ("why", "so")
    # With special tokens kept for the tags, stray tags vanish as skip_special_tokens would make them.
    assert parse_reasoning("hi[T]a[/T]", cfg, drop=["<|x|>"]) == ("", "hia")
    assert parse_reasoning("[T]a[T][/T]b[/T]", cfg, drop=["<|x|>"]) == ("a", "b")


@pytest.mark.parametrize(
    ("prompt", "opens"),
    [
        ("<|im_start|>assistant\n<think>\n", True),
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
        ("user asked about <think> tags\n<|im_start|>assistant\n", False),
        ("", False),
        (None, False),
    ],
)
def test_prompt_that_opens_reasoning(prompt, opens):
    assert prompt_opens_thinking(prompt, CFG) is opens


class _Tok:
    vocab = {"<think>": 5, "</think>": 6}

    def token_to_id(self, token):
        return self.vocab.get(token)

    def encode(self, text, add_special_tokens=True):
        return [self.vocab[text]] if text in self.vocab else [100 + ord(ch) for ch in text]


def test_thinking_tokens_put_the_wrap_up_before_the_end_tag():
    tokens = thinking_tokens(_Tok(), ThinkingConfig(wrap_up="ok"))
    assert tokens.start_token_id == 5
    assert tokens.end_token_ids == [100 + ord("o"), 100 + ord("k"), 6]
    assert tokens.end_tag_ids == [6]


def test_count_reasoning_tokens_on_ids():
    assert count_reasoning_tokens([5, 1, 2, 3, 6, 9], [6], False, 5) == 3
    assert count_reasoning_tokens([1, 2, 6, 9], [6], True, 5) == 2
    assert count_reasoning_tokens([1, 2, 3], [6], True, 5) == 3
    assert count_reasoning_tokens([1, 2, 3], [6], False, 5) == 0


def _reference_count(ids: list[int], end: list[int], starts_in: bool, start: int | None) -> int:
    """The rule on a whole id list, written plainly: from after the first start id to the first end tag."""
    begin = 0
    if not starts_in:
        if start is None or start not in ids:
            return 0
        begin = ids.index(start) + 1
    for i in range(begin, len(ids) - len(end) + 1):
        if end and ids[i : i + len(end)] == end:
            return i - begin
    return len(ids) - begin


def test_reasoning_counter_fed_in_any_chunks_counts_like_the_whole_list():
    rng = random.Random(1)
    for _ in range(500):
        ids = [rng.randrange(1, 6) for _ in range(rng.randrange(0, 30))]
        end = [rng.randrange(1, 6) for _ in range(rng.randrange(0, 3))]
        starts_in, start = rng.random() < 0.5, rng.choice([None, 1, 2])
        counter = ReasoningTokenCounter(end, starts_in, start)
        position = 0
        while position < len(ids):
            step = rng.randrange(1, 5)
            counter.feed(ids[position : position + step])
            position += step
        assert counter.count == _reference_count(ids, end, starts_in, start), (ids, end, starts_in, start)
