"""Fixtures shared by the structured-output unit tests: a tiny tokenizer, a padded logits width, a compiler."""

from __future__ import annotations

import pytest

from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.structured import GrammarCompiler
from tokenmill.tools.tiny_tokenizer import build_tiny_tokenizer

PAD = 24  # checkpoints often pad the lm_head past the tokenizer's size


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(folder)
    return Tokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def width(tok: Tokenizer) -> int:
    return tok.vocab_size + PAD


@pytest.fixture(scope="module")
def compiler(tok: Tokenizer, width: int) -> GrammarCompiler:
    return GrammarCompiler(tok, width, [tok.eos_token_id])
