"""The engine's grammar masks: filled inline (model on CPU) or on a background thread (GPU), same result."""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_structured import SCHEMA, allowed_ids
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.structured import GrammarCompiler, GrammarMatcher, StructuredOutputParams
from tokenmill.structured.backend import fill_bitmasks
from tokenmill.sample.bitmask import allocate_bitmask, unpack_bitmask
from tokenmill.sample.shaping import shape_logits
from tokenmill.sample.state import SamplingState
from tokenmill.sampling_params import SamplingParams


@pytest.mark.parametrize("overlap", [True, False])
def test_grammar_masks_inline_or_overlapped_mask_the_same_rows(overlap: bool, tok: Tokenizer, width: int,
                                                               compiler: GrammarCompiler) -> None:
    from tokenmill.worker.grammar_masks import GrammarMasks

    matchers = [compiler.matcher(StructuredOutputParams(choice=["yes", "no"])) for _ in range(2)]
    matchers[1].accept_token(tok.encode("no", add_special_tokens=False)[0])
    logits = torch.zeros(3, width)
    bitmask = GrammarMasks(compiler, width, overlap=overlap).start(matchers).result().bitmask
    states = [SamplingState(SamplingParams(), [1], [], None) for _ in range(3)]
    masked = shape_logits(logits, states, grammar_mask=(bitmask, [2, 0]))
    expected = torch.zeros(3, width)
    for matcher, row in zip(matchers, [2, 0]):
        expected[row][~torch.tensor(allowed_ids_mask(matcher, width))] = float("-inf")
    assert torch.equal(masked, expected)
    assert torch.equal(logits, torch.zeros(3, width))  # the caller's logits are not changed


def allowed_ids_mask(matcher: GrammarMatcher, width: int) -> list[bool]:
    allowed = set(allowed_ids(matcher, width))
    return [i in allowed for i in range(width)]


def test_batched_fill_equals_one_by_one(tok: Tokenizer, width: int, compiler: GrammarCompiler) -> None:
    texts = ['{"id": 3', '{"id": 3, "name": "a', "", '{"id": 3, "name": "ab", "kind": "dog", "tags": ["x"]']
    matchers = []
    for text in texts:
        matcher = compiler.matcher(StructuredOutputParams(json=SCHEMA))
        assert matcher.num_valid_prefix(tok.encode(text, add_special_tokens=False)) == len(tok.encode(text))
        for token in tok.encode(text, add_special_tokens=False):
            matcher.accept_token(token)
        matchers.append(matcher)
    done = compiler.matcher(StructuredOutputParams(choice=["no"]))
    for token in tok.encode("no", add_special_tokens=False) + [tok.eos_token_id]:
        assert done.accept_token(token)
    matchers.append(done)
    batched, serial, single = (allocate_bitmask(7, width) for _ in range(3))
    rows = [6, 0, 2, 3, 5]
    fill_bitmasks(matchers, batched, rows)
    fill_bitmasks(matchers, serial, rows, parallel=False)
    for matcher, row in zip(matchers, rows):
        matcher.fill_bitmask(single, row)
    assert torch.equal(batched, single)
    assert torch.equal(serial, single)
    assert unpack_bitmask(batched[5:6], width)[0].nonzero().flatten().tolist() == [tok.eos_token_id]
    assert (batched[[1, 4]] == -1).all()  # rows no matcher filled still allow everything
