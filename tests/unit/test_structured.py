"""Structured output: random walks under the mask always give valid output, EOS comes exactly when the
grammar can end, rollback / prefix validation are exact, errors name the field."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import threading

import pytest
import torch

from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.errors import InvalidRequestError
from tokenmill.structured import GrammarCompiler, GrammarMatcher, StructuredOutputParams
from tokenmill.sample.bitmask import allocate_bitmask, apply_bitmask, unpack_bitmask

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llguidance") is None,
                                reason="needs llguidance (pip install 'tokenmill[test]')")

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 500},
        "name": {"type": "string", "maxLength": 10},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "weight": {"type": "number", "minimum": 0.5, "maximum": 20},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 1, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {
                "email": {"type": "string", "maxLength": 12},
                "scores": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
                           "maxItems": 4},
            },
            "required": ["email", "scores"],
            "additionalProperties": False,
        },
        "alive": {"type": "boolean"},
    },
    "required": ["id", "name", "kind", "tags", "owner"],
    "additionalProperties": False,
}
PHONE = r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"
DATE = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
CHOICES = ["yes", "no", "maybe so", "café ☕", 'say "hi"\n']
GBNF = (
    'root ::= command ("; " command){0,3}\n'
    'command ::= "move " dir " " num | "say \\"" [a-z ]{1,10} "\\""\n'
    'dir ::= "left" | "right" | "up" | "down"\n'
    "num ::= [1-9] [0-9]{0,2}\n"
)
_COMMAND = r'(move (left|right|up|down) [1-9][0-9]{0,2}|say "[a-z ]{1,10}")'
GBNF_LANGUAGE = re.compile(rf"{_COMMAND}(; {_COMMAND}){{0,3}}")
LARK = 'start: greeting " " name\ngreeting: "hello" | "hi"\nname: /[A-Z][a-z]{1,5}/\n'
PAD = 24  # checkpoints often pad the lm_head past the tokenizer's size


def allowed_ids(matcher: GrammarMatcher, width: int) -> list[int]:
    bitmask = allocate_bitmask(1, width)
    matcher.fill_bitmask(bitmask, 0)
    return unpack_bitmask(bitmask, width)[0].nonzero().flatten().tolist()


def walk(matcher: GrammarMatcher, tok: Tokenizer, width: int, seed: int, cap: int = 400,
         on_step=None, prefer: set[int] | None = None) -> tuple[list[int], bool]:
    """Uniformly random allowed tokens until EOS is picked; returns (tokens before EOS, ended).
    With `prefer`, after 20 tokens the walk picks among the allowed ones of those when there are any."""
    gen, eos, out = torch.Generator().manual_seed(seed), tok.eos_token_id, []
    special = {i for i in range(tok.vocab_size) if tok.is_skipped_special(i)} - {eos}
    for _ in range(cap):
        allowed = allowed_ids(matcher, width)
        assert allowed, "the mask allows nothing"
        assert max(allowed) < tok.vocab_size, "a padding id of the lm_head was allowed"
        assert not special & set(allowed), "a special token other than EOS was allowed"
        if on_step is not None:
            on_step(list(out), allowed)
        if prefer is not None and len(out) >= 20 and prefer & set(allowed):
            allowed = sorted(prefer & set(allowed))
        token = allowed[int(torch.randint(len(allowed), (1,), generator=gen))]
        assert matcher.accept_token(token)
        if token == eos:
            assert matcher.is_terminated()
            return out, True
        out.append(token)
    return out, False


def text_of(tok: Tokenizer, tokens: list[int]) -> str:
    return tok.decode(tokens, skip_special_tokens=False)


# ---- random walks always produce valid output -------------------------------------------------------

@pytest.mark.parametrize("seed", range(50))
def test_json_schema_random_walk(seed: int, tok: Tokenizer, width: int, compiler: GrammarCompiler) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(SCHEMA)
    eos = tok.eos_token_id

    def complete(tokens: list[int]) -> bool:
        try:
            return validator.is_valid(json.loads(text_of(tok, tokens)))
        except json.JSONDecodeError:
            return False

    def check_eos(tokens: list[int], allowed: list[int]) -> None:
        # EOS exactly when the text so far is a valid document; a closed object can only be followed by EOS.
        if complete(tokens):
            assert allowed == [eos], text_of(tok, tokens)
        else:
            assert eos not in allowed, text_of(tok, tokens)

    tokens, ended = walk(compiler.matcher(StructuredOutputParams(json=SCHEMA)), tok, width, seed, on_step=check_eos)
    text = text_of(tok, tokens)
    assert ended, f"no EOS within 400 tokens: {text!r}"
    jsonschema.validate(json.loads(text), SCHEMA)
    skeleton = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text).replace(", ", ",").replace(": ", ":")
    assert not re.search(r"\s", skeleton), text  # outside strings, whitespace only in ", " and ": "


@pytest.mark.parametrize("pattern", [PHONE, DATE])
def test_regex_random_walk(pattern: str, tok: Tokenizer, width: int, compiler: GrammarCompiler) -> None:
    for seed in range(25):
        tokens, ended = walk(compiler.matcher(StructuredOutputParams(regex=pattern)), tok, width, seed)
        assert ended and re.fullmatch(pattern, text_of(tok, tokens)), text_of(tok, tokens)


def test_choice_random_walk_and_every_choice_reachable(tok: Tokenizer, width: int, compiler: GrammarCompiler) -> None:
    params = StructuredOutputParams(choice=CHOICES)
    seen = set()
    for seed in range(40):
        tokens, ended = walk(compiler.matcher(params), tok, width, seed)
        assert ended and text_of(tok, tokens) in CHOICES
        seen.add(text_of(tok, tokens))
    assert len(seen) >= 3
    for choice in CHOICES:
        ids = tok.encode(choice, add_special_tokens=False)
        assert compiler.matcher(params).num_valid_prefix(ids + [tok.eos_token_id]) == len(ids) + 1, choice
    ye = tok.encode("ye", add_special_tokens=False)
    assert compiler.matcher(params).num_valid_prefix(ye + [tok.eos_token_id]) == len(ye)  # not a whole choice


def test_json_object(tok: Tokenizer, width: int, compiler: GrammarCompiler) -> None:
    params = StructuredOutputParams(json_object=True)
    assert [tok.decode([i]) for i in allowed_ids(compiler.matcher(params), width)] == ["{"]
    text = '{"a": [1, 2.5, {"b": null}], "c": "x\\ny", "d": true}'
    ids = tok.encode(text, add_special_tokens=False)
    assert compiler.matcher(params).num_valid_prefix(ids + [tok.eos_token_id]) == len(ids) + 1
    # Nesting is unbounded, so after a while the walks lean towards closing brackets, quotes and EOS.
    closers = {i for i in range(tok.vocab_size) if tok.decode([i]) in ("}", "]", '"')} | {tok.eos_token_id}
    nonempty = 0
    for seed in range(12):
        tokens, ended = walk(compiler.matcher(params), tok, width, seed, prefer=closers)
        assert ended, text_of(tok, tokens)
        doc = json.loads(text_of(tok, tokens))
        assert isinstance(doc, dict)
        nonempty += bool(doc)
    assert nonempty >= 3


def test_ebnf_grammars(tok: Tokenizer, width: int, compiler: GrammarCompiler) -> None:
    for seed in range(30):
        tokens, ended = walk(compiler.matcher(StructuredOutputParams(grammar=GBNF)), tok, width, seed)
        assert ended and GBNF_LANGUAGE.fullmatch(text_of(tok, tokens)), text_of(tok, tokens)
        tokens, ended = walk(compiler.matcher(StructuredOutputParams(grammar=LARK)), tok, width, seed)
        assert ended and re.fullmatch(r"(hello|hi) [A-Z][a-z]{1,5}", text_of(tok, tokens)), text_of(tok, tokens)


# ---- vocabulary edges ---------------------------------------------------------------------------------

def test_padding_ids_never_allowed(tok: Tokenizer, width: int, compiler: GrammarCompiler) -> None:
    matcher = compiler.matcher(StructuredOutputParams(regex=".{0,5}"))  # allows almost every token
    allowed = allowed_ids(matcher, width)
    assert len(allowed) > tok.vocab_size // 2 and max(allowed) < tok.vocab_size
    assert not matcher.accept_token(tok.vocab_size + 3) and not matcher.accept_token(-1)
    assert matcher.num_valid_prefix([tok.vocab_size]) == 0
    bitmask = allocate_bitmask(1, width)
    matcher.fill_bitmask(bitmask, 0)
    logits = torch.randn(1, width)
    apply_bitmask(logits, bitmask)
    assert torch.isinf(logits[0, tok.vocab_size:]).all() and torch.isfinite(logits[0, allowed]).all()


def test_several_eos_ids(tok: Tokenizer, width: int) -> None:
    im_end = tok.token_to_id("<|im_end|>")
    compiler = GrammarCompiler(tok, width, [tok.eos_token_id, im_end])
    matcher = compiler.matcher(StructuredOutputParams(regex="ab?"))
    assert matcher.accept_token(tok.encode("a", add_special_tokens=False)[0])
    assert {tok.eos_token_id, im_end} <= set(allowed_ids(matcher, width))
    assert matcher.accept_token(im_end) and matcher.is_terminated()
    assert not matcher.accept_token(tok.eos_token_id)
    assert allowed_ids(matcher, width) == sorted([tok.eos_token_id, im_end])  # finished: only EOS, never empty


def test_model_vocab_smaller_than_tokenizer(tok: Tokenizer) -> None:
    with pytest.raises(InvalidRequestError, match="tokenizer has"):
        GrammarCompiler(tok, tok.vocab_size - 10, [tok.eos_token_id]).compile(StructuredOutputParams(regex="a"))


# ---- exact rollback and prefix validation ----------------------------------------------------------------

def test_rollback_and_num_valid_prefix_are_exact(tok: Tokenizer, width: int, compiler: GrammarCompiler) -> None:
    params = StructuredOutputParams(json=SCHEMA)
    eos = tok.eos_token_id
    for seed in range(5):
        tokens, ended = walk(compiler.matcher(params), tok, width, seed)
        assert ended
        matcher = compiler.matcher(params)
        masks = [allowed_ids(matcher, width)]
        assert matcher.num_valid_prefix(tokens + [eos]) == len(tokens) + 1
        assert matcher.num_valid_prefix(tokens + [eos, tokens[0]]) == len(tokens) + 1  # nothing after EOS
        assert allowed_ids(matcher, width) == masks[0]  # validation left no trace
        for token in tokens:
            assert matcher.accept_token(token)
            masks.append(allowed_ids(matcher, width))
        gen = torch.Generator().manual_seed(seed)
        for _ in range(8):  # roll back a random amount, compare masks, replay
            back = int(torch.randint(len(tokens) + 1, (1,), generator=gen))
            matcher.rollback(back)
            assert allowed_ids(matcher, width) == masks[len(tokens) - back]
            for token in tokens[len(tokens) - back:]:
                assert matcher.accept_token(token)
        assert matcher.accept_token(eos) and matcher.is_terminated()
        matcher.rollback(1)
        assert not matcher.is_terminated() and allowed_ids(matcher, width) == masks[-1]
        with pytest.raises(ValueError):
            matcher.rollback(len(tokens) + 1)

        # A disallowed token at position j: the prefix count is j, and accept_token refuses it unchanged.
        fresh = compiler.matcher(params)
        j = len(tokens) // 2
        for token in tokens[:j]:
            fresh.accept_token(token)
        bad = next(i for i in range(tok.vocab_size) if i not in masks[j])
        before = allowed_ids(fresh, width)
        assert fresh.num_valid_prefix([bad]) == 0 and not fresh.accept_token(bad)
        assert allowed_ids(fresh, width) == before
        assert compiler.matcher(params).num_valid_prefix(tokens[:j] + [bad] + tokens[j:]) == j
        assert compiler.matcher(params).num_valid_prefix(tokens[:j] + [eos]) == j  # EOS before the end


def test_num_valid_prefix_matches_accept_loop(tok: Tokenizer, compiler: GrammarCompiler) -> None:
    params = StructuredOutputParams(regex=r"[a-z]{1,6}( [a-z]{1,6}){0,3}")
    gen = torch.Generator().manual_seed(0)
    words = tok.encode("the quick brown fox jumps over", add_special_tokens=False)
    for _ in range(200):
        draft = [words[int(i)] if i < len(words) else int(torch.randint(tok.vocab_size, (1,), generator=gen))
                 for i in torch.randint(len(words) + 4, (6,), generator=gen)]
        if torch.rand(1, generator=gen) < 0.3:
            draft[int(torch.randint(6, (1,), generator=gen))] = tok.eos_token_id
        predicted = compiler.matcher(params).num_valid_prefix(draft)
        matcher = compiler.matcher(params)
        actual = 0
        while actual < len(draft) and matcher.accept_token(draft[actual]):
            actual += 1
        assert predicted == actual, draft


# ---- errors name the field ---------------------------------------------------------------------------

@pytest.mark.parametrize("params, field, words", [
    (StructuredOutputParams(json={"type": "foo"}), "response_format", "foo"),
    (StructuredOutputParams(json='{"type": "object", '), "response_format", "not valid JSON"),
    (StructuredOutputParams(json="[1, 2]"), "response_format", "JSON object"),
    (StructuredOutputParams(json={"type": "array", "minItems": 3, "maxItems": 1}), "response_format", "minItems"),
    (StructuredOutputParams(json={"properties": {"a": {"$ref": "#/$defs/Nope"}}}), "response_format", "Nope"),
    (StructuredOutputParams(regex="a(b"), "guided_regex", "unclosed"),
    (StructuredOutputParams(regex=3), "guided_regex", "string"),
    (StructuredOutputParams(grammar="root ::= undefined_rule"), "guided_grammar", "undefined_rule"),
    (StructuredOutputParams(grammar="root ::= [a-"), "guided_grammar", "GBNF"),
    (StructuredOutputParams(grammar="start: foo"), "guided_grammar", "foo"),
    (StructuredOutputParams(grammar="  "), "guided_grammar", "empty"),
    (StructuredOutputParams(choice=[]), "guided_choice", "non-empty"),
    (StructuredOutputParams(choice=["a", 2]), "guided_choice", "string"),
    (StructuredOutputParams(regex="a", choice=["a"]), "structured_outputs", "exactly one"),
    (StructuredOutputParams(json_object=True, json={}), "structured_outputs", "exactly one"),
    (StructuredOutputParams(), "structured_outputs", "none"),
])
def test_invalid_requests(params: StructuredOutputParams, field: str, words: str, compiler: GrammarCompiler) -> None:
    with pytest.raises(InvalidRequestError) as info:
        compiler.compile(params)
    assert info.value.field == field and words in info.value.message, info.value.message


def test_missing_library_names_the_package(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llguidance", None)  # makes `import llguidance` raise ImportError
    with pytest.raises(InvalidRequestError, match="pip install llguidance") as info:
        GrammarCompiler(tok, tok.vocab_size, [tok.eos_token_id]).compile(StructuredOutputParams(regex="a"))
    assert info.value.field == "guided_regex"


def test_import_is_lazy() -> None:
    code = ("import sys, tokenmill, tokenmill.structured; from tokenmill.structured.params import StructuredOutputParams\n"
            "StructuredOutputParams(json={'type': 'object'}).cache_key()\n"
            "assert 'llguidance' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- compile cache ----------------------------------------------------------------------------------

def test_same_schema_compiles_once(tok: Tokenizer, width: int) -> None:
    compiler = GrammarCompiler(tok, width, [tok.eos_token_id], cache_size=2)
    first = compiler.compile(StructuredOutputParams(json=SCHEMA))
    reordered = json.dumps(dict(reversed(list(SCHEMA.items()))), indent=2)  # other key order and whitespace
    assert compiler.compile(StructuredOutputParams(json=reordered)) is first
    assert compiler.cache_info()["misses"] == 1 and compiler.cache_info()["hits"] == 1
    compiler.compile(StructuredOutputParams(regex="a"))
    compiler.compile(StructuredOutputParams(regex="b"))  # evicts the least recently used: the schema
    assert compiler.compile(StructuredOutputParams(json=SCHEMA)) is not first
    assert compiler.cache_info() == {"hits": 1, "misses": 4, "size": 2, "max_size": 2}


def test_concurrent_compiles_and_background_masks(tok: Tokenizer, width: int) -> None:
    compiler = GrammarCompiler(tok, width, [tok.eos_token_id])
    params = StructuredOutputParams(json=SCHEMA)
    matchers: list[GrammarMatcher] = []
    threads = [threading.Thread(target=lambda: matchers.append(compiler.matcher(params))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert compiler.cache_info()["misses"] == 1 and len(matchers) == 8
    bitmask = allocate_bitmask(len(matchers), width)
    filler = threading.Thread(target=lambda: [m.fill_bitmask(bitmask, i) for i, m in enumerate(matchers)])
    filler.start()
    filler.join()
    assert (bitmask == bitmask[0]).all() and unpack_bitmask(bitmask, width)[0].sum() == 1  # only "{"



# ---- bitmask application ------------------------------------------------------------------------------

def test_apply_bitmask_matches_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    vocab = 77
    bitmask = torch.randint(-(2 ** 31), 2 ** 31 - 1, (4, 3), generator=gen, dtype=torch.int32)
    logits = torch.randn(4, vocab, generator=gen)
    expected = logits.clone()
    for r in range(4):
        for i in range(vocab):
            if not (int(bitmask[r, i // 32]) >> (i % 32)) & 1:
                expected[r, i] = float("-inf")
    whole = logits.clone()
    apply_bitmask(whole, bitmask)
    assert torch.equal(whole, expected)
    some = logits.clone()
    apply_bitmask(some, bitmask, rows=[2, 0])
    assert torch.equal(some[[0, 2]], expected[[0, 2]]) and torch.equal(some[[1, 3]], logits[[1, 3]])
    wide = torch.randn(4, 100, generator=gen)  # logits wider than the mask: the extra ids are disallowed
    apply_bitmask(wide, bitmask)
    assert torch.isinf(wide[:, 96:]).all()
    untouched = logits.clone()
    apply_bitmask(untouched, allocate_bitmask(4, vocab))  # a fresh mask allows everything
    assert torch.equal(untouched, logits)
