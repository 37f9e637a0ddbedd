"""A grammar's compile is bounded by work, not only refused after the fact: exploding regexes and patterns are
refused with a 400 naming their field within a bounded amount of CPU, and grammars that nest deep through rule or
`$ref` chains (shallow as text) compile or are refused without overflowing the compiler's stack."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time

import pytest

from tokenmill.errors import InvalidRequestError
from tokenmill.structured import GrammarCompiler, StructuredOutputParams

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llguidance") is None, reason="needs llguidance")

# llguidance's default lexer fuel spent 1.2-4.7 s of CPU on each of these before failing anyway.
EXPLODING = [
    (StructuredOutputParams(regex="x{1000}{1000}"), "guided_regex"),
    (StructuredOutputParams(regex="x{1000}{1000}{1000}"), "guided_regex"),
    (StructuredOutputParams(regex="(x{1000}){1000}y"), "guided_regex"),
    (StructuredOutputParams(json={"type": "string", "pattern": "^x{1000}{1000}$"}), "response_format"),
    (StructuredOutputParams(json={"type": "object", "required": ["a"],
                                  "properties": {"a": {"type": "string", "pattern": "^(x{1000}){1000}$"}}}),
     "response_format"),
]


@pytest.mark.parametrize(("params", "field"), EXPLODING, ids=[f"{p.kind}-{i}" for i, (p, _) in enumerate(EXPLODING)])
def test_an_exploding_grammar_is_refused_in_bounded_work(tok, width, params, field):
    compiler = GrammarCompiler(tok, width, [tok.eos_token_id])
    cpu = time.process_time()  # every thread of the process: the compile runs on the compiler's own threads
    with pytest.raises(InvalidRequestError) as info:
        compiler.compile(params)
    spent = time.process_time() - cpu
    assert info.value.field == field and "over the matcher's limits" in info.value.message, info.value.message
    assert "<non-verbose/>" not in info.value.message
    assert spent < 0.5, f"the refused compile took {spent:.2f} s of CPU"
    cpu = time.process_time()
    with pytest.raises(InvalidRequestError):  # remembered: refused again at no cost
        compiler.compile(params)
    assert time.process_time() - cpu < 0.01


def test_large_real_lexemes_still_compile(tok, width):
    compiler = GrammarCompiler(tok, width, [tok.eos_token_id])
    for regex in ("x{30000}", "[0-9a-f]{64}", r"(https?://)?[a-z0-9.-]+\.[a-z]{2,6}(/[a-z0-9._~-]*){0,20}"):
        matcher = compiler.matcher(StructuredOutputParams(regex=regex))
        assert matcher.num_valid_prefix(tok.encode("x", add_special_tokens=False)) in (0, 1)


_DEEP = """
import sys, tempfile
from tokenmill.tools.tiny_tokenizer import build_tiny_tokenizer
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.errors import InvalidRequestError
from tokenmill.structured import GrammarCompiler, StructuredOutputParams
folder = tempfile.mkdtemp(); build_tiny_tokenizer(folder); tok = Tokenizer.from_pretrained(folder)
n = {n}
defs = {{"a0": {{"type": "string"}}}}
for i in range(1, n + 1):
    defs[f"a{{i}}"] = {{"type": "array", "items": {{"$ref": f"#/$defs/a{{i - 1}}"}}}}
cases = [StructuredOutputParams(json={{"$defs": defs, "$ref": f"#/$defs/a{{n}}"}}),
         StructuredOutputParams(grammar="start: r0\\n" + "".join(f'r{{i}}: r{{i + 1}} "a"\\n' for i in range(n))
                                + f'r{{n}}: "b"\\n')]
compiler = GrammarCompiler(tok, tok.vocab_size, [tok.eos_token_id], compile_budget_s=600)
for params in cases:
    try:
        compiler.compile(params)
        print("compiled")
    except InvalidRequestError as error:
        print("refused", error.field)
"""


@pytest.mark.parametrize("depth", [3000, 12000])
def test_rule_and_ref_chains_never_overflow_the_compilers_stack(depth):
    """On an 8 MiB stack llguidance dies (SIGSEGV, the whole server with it) at ~1,500 $refs or ~3,000 rules."""
    result = subprocess.run([sys.executable, "-c", _DEEP.format(n=depth)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert len(result.stdout.split("\n")) == 3, result.stdout  # an answer for each case, compiled or refused
