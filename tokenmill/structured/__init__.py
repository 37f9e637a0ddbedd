"""Structured output: grammars (JSON schema, regex, choice, EBNF) turned into per-step token masks.

    compiler = GrammarCompiler(tokenizer, vocab_size=model_vocab, eos_token_ids=eos_ids)   # one per engine
    matcher = compiler.matcher(StructuredOutputParams(json=schema))                     # one per request
    bitmask = allocate_bitmask(batch, model_vocab)
    each step: matcher.fill_bitmask(bitmask, row); apply_bitmask(logits, bitmask, rows); sample;
               matcher.accept_token(token)

Names resolve lazily, so `from tokenmill.structured.params import StructuredOutputParams` stays pure
Python and the grammar library (llguidance) loads only when the first grammar is compiled.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "StructuredOutputParams": "tokenmill.structured.params",
    "GrammarCompiler": "tokenmill.structured.backend",
    "CompiledGrammar": "tokenmill.structured.backend",
    "GrammarMatcher": "tokenmill.structured.backend",
    "fill_bitmasks": "tokenmill.structured.backend",
    "allocate_bitmask": "tokenmill.sample.bitmask",
    "apply_bitmask": "tokenmill.sample.bitmask",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tokenmill.structured' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
