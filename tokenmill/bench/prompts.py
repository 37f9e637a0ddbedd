"""Where benchmark prompts come from: random token ids (BENCHMARKS.md's recipes) or windows of real text.

Random ids measure the engine; speculative decoding needs real text, because drafts only get accepted
where the model can predict what comes next.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.utils.text_files import gather_files, read_corpus

PromptMaker = Callable[[random.Random, int], list[int]]  # (rng, length) -> prompt token ids


def random_prompts(vocab_size: int) -> PromptMaker:
    return lambda rng, length: [rng.randrange(vocab_size) for _ in range(length)]


def text_prompts(tokenizer: Tokenizer, paths: Sequence[str], extensions: Sequence[str] = (".py",)) -> PromptMaker:
    """Prompts cut from the given files (or files under the given folders): a random document long enough,
    then a random window of `length` tokens in it."""
    corpus = read_corpus(gather_files(paths, extensions, option="--prompt-files"))
    docs = [ids for ids in (tokenizer.encode(d.text, add_special_tokens=False) for d in corpus.documents) if ids]
    if not docs:
        raise ValueError(f"--prompt-files: no readable text with extensions {list(extensions)} in {list(paths)}")
    longest = max(len(d) for d in docs)
    long_enough: dict[int, list[list[int]]] = {}  # by prompt length, computed once per length

    def make(rng: random.Random, length: int) -> list[int]:
        if length > longest:
            raise ValueError(f"--input-len {length} is longer than the longest prompt file ({longest} tokens)")
        if length not in long_enough:
            long_enough[length] = [d for d in docs if len(d) >= length]
        doc = rng.choice(long_enough[length])
        start = rng.randrange(len(doc) - length + 1)
        return doc[start : start + length]

    return make
