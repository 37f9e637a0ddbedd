"""Measure xgrammar against llguidance on the same grammars and tokenizers; the figures behind
docs/structured_output.md.

    python -m tokenmill.bench.grammar_backends [--walks 50] [--big-vocab 128000] [--backend-only]

The comparison needs both libraries (`pip install llguidance jsonschema` and `pip install --no-deps
xgrammar apache-tvm-ffi`, so pip keeps the CPU torch). Each library is driven through its own low-level
API, not through tokenmill's backend, so neither pays the other's wrapping costs. Both fill the same
int32 bitmask layout. A last table times tokenmill's own backend; --backend-only prints just that and
needs only llguidance.
"""

from __future__ import annotations

import abc
import argparse
import functools
import importlib
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.tools.tiny_tokenizer import build_tiny_tokenizer

NESTED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 9999},
        "name": {"type": "string", "maxLength": 12},
        "status": {"enum": ["active", "inactive", "banned"]},
        "score": {"type": "number", "minimum": -1, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"login": {"type": "string", "maxLength": 8}, "admin": {"type": "boolean"}},
            "required": ["login", "admin"],
            "additionalProperties": False,
        },
    },
    "required": ["id", "name", "status", "tags", "owner"],
    "additionalProperties": False,
}
DATE_REGEX = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
# GBNF (llama.cpp) syntax, which both libraries read; the Python regex below accepts the same language.
COMMAND_GBNF = (
    'root ::= command ("; " command){0,3}\n'
    'command ::= "move " dir " " num | "say \\"" [a-z ]{1,10} "\\""\n'
    'dir ::= "left" | "right" | "up" | "down"\n'
    "num ::= [1-9] [0-9]{0,2}\n"
)
_COMMAND = r'(move (left|right|up|down) [1-9][0-9]{0,2}|say "[a-z ]{1,10}")'
COMMAND_REGEX = rf"{_COMMAND}(; {_COMMAND}){{0,3}}"


class _Lib(abc.ABC):
    """One library behind the operations a random walk needs (the constructor builds its tokenizer view)."""

    name = ""
    module = ""

    @abc.abstractmethod
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: list[int]) -> None: ...

    @abc.abstractmethod
    def compile(self, kind: str, source: Any) -> Any: ...

    @abc.abstractmethod
    def matcher(self, compiled: Any) -> Any: ...

    @abc.abstractmethod
    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def accept(self, matcher: Any, token_id: int) -> bool: ...


class _LLGuidance(_Lib):
    name = module = "llguidance"

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: list[int]) -> None:
        import llguidance

        self._llg = llguidance
        # The tokenizer.json text, added tokens included: llguidance reads token bytes and special flags itself.
        self._tok = llguidance.LLTokenizer(tokenizer._tok.to_str(), n_vocab=vocab_size, eos_token=eos_ids)
        self._opts = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

    def compile(self, kind: str, source: Any) -> Any:
        llg = self._llg
        if kind == "json":
            grammar = llg.LLMatcher.grammar_from_json_schema(source, defaults=self._opts)
        elif kind == "regex":
            grammar = llg.LLMatcher.grammar_from_regex(source)
        else:
            grammar = llg.grammar_from("grammar", source)
        template = llg.LLMatcher(self._tok, grammar, log_level=0)
        if template.is_error():
            raise ValueError(template.get_error())
        return template

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)

    def accept(self, matcher: Any, token_id: int) -> bool:
        return matcher.consume_token(token_id)


class _XGrammar(_Lib):
    name = module = "xgrammar"

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: list[int]) -> None:
        import xgrammar

        self._xgr = xgrammar
        encoded = tokenizer.convert_ids_to_tokens(range(tokenizer.vocab_size))
        # xgrammar treats every vocabulary string as text; blank the special tokens (as its from_huggingface
        # does not) so "<|im_end|>" cannot be emitted inside a JSON string.
        special = {i for i in range(tokenizer.vocab_size) if tokenizer.is_skipped_special(i)}
        vocab = ["" if i in special else (t or "") for i, t in enumerate(encoded)]
        meta = xgrammar.TokenizerInfo._detect_metadata_from_hf(tokenizer._tok.to_str())
        info = xgrammar.TokenizerInfo(vocab, meta["vocab_type"], vocab_size=vocab_size, stop_token_ids=eos_ids,
                                      add_prefix_space=meta["add_prefix_space"])
        # Cache off so every compile below is a real compile.
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)

    def compile(self, kind: str, source: Any) -> Any:
        if kind == "json":
            return self._compiler.compile_json_schema(json.dumps(source), any_whitespace=False)
        if kind == "regex":
            return self._compiler.compile_regex(source)
        return self._compiler.compile_grammar(source)

    def matcher(self, compiled: Any) -> Any:
        return self._xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        matcher.fill_next_token_bitmask(bitmask, 0)

    def accept(self, matcher: Any, token_id: int) -> bool:
        return matcher.accept_token(token_id)


def _allowed(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    bits = (bitmask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.reshape(-1)[:vocab_size].nonzero().flatten()


def _walk(lib: _Lib, compiled: Any, vocab_size: int, eos: set[int], seed: int, cap: int,
          mask_us: list[float]) -> tuple[list[int], bool]:
    """Uniformly random allowed tokens until EOS; returns (tokens, ended)."""
    gen = torch.Generator().manual_seed(seed)
    bitmask = torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32)
    matcher = lib.matcher(compiled)
    out: list[int] = []
    for _ in range(cap):
        start = time.perf_counter()
        lib.fill(matcher, bitmask)
        mask_us.append((time.perf_counter() - start) * 1e6)
        allowed = _allowed(bitmask, vocab_size)
        token = int(allowed[torch.randint(len(allowed), (1,), generator=gen)])
        if token in eos:
            return out, True
        if not lib.accept(matcher, token):
            raise AssertionError(f"{lib.name} refused token {token} that its own mask allowed")
        out.append(token)
    return out, False


def _checker(kind: str, source: Any, strict: bool = True) -> Callable[[str], bool]:
    if kind == "json":
        import jsonschema

        validator = jsonschema.Draft202012Validator(source)

        def check_json(text: str) -> bool:
            try:  # strict=False lets raw control characters inside strings through (RFC 8259 forbids them)
                return validator.is_valid(json.loads(text, strict=strict))
            except json.JSONDecodeError:
                return False
        return check_json
    pattern = re.compile(source if kind == "regex" else COMMAND_REGEX)
    return lambda text: pattern.fullmatch(text) is not None


def _compile_and_fill(lib: _Lib, kind: str, source: Any, bitmask: torch.Tensor) -> None:
    lib.fill(lib.matcher(lib.compile(kind, source)), bitmask)


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _import_seconds(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


GRAMMARS = [("json", NESTED_SCHEMA), ("regex", DATE_REGEX), ("grammar", COMMAND_GBNF)]


def measure(lib_cls: type[_Lib], tokenizer: Tokenizer, vocab_size: int, walks: int, cap: int) -> dict[str, Any]:
    """Setup, compile, time-to-first-mask, per-token mask time and walk validity for one library."""
    assert tokenizer.eos_token_id is not None
    eos = [tokenizer.eos_token_id]
    importlib.import_module(lib_cls.module)  # import time is reported on its own, not as setup
    start = time.perf_counter()
    lib = lib_cls(tokenizer, vocab_size, eos)
    row: dict[str, Any] = {"lib": lib.name, "setup_ms": (time.perf_counter() - start) * 1e3}
    special = {i for i in range(tokenizer.vocab_size) if tokenizer.is_skipped_special(i)} - set(eos)
    for kind, source in GRAMMARS:
        compiled = lib.compile(kind, source)
        bitmask = torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32)
        row[f"{kind}_compile_ms"] = _median_ms(functools.partial(lib.compile, kind, source), repeats=5)
        row[f"{kind}_first_mask_ms"] = _median_ms(
            functools.partial(_compile_and_fill, lib, kind, source, bitmask), repeats=5)
        mask_us: list[float] = []
        check, lenient = _checker(kind, source), _checker(kind, source, strict=False)
        valid = ended = leaks = valid_lenient = 0
        for seed in range(walks):
            tokens, done = _walk(lib, compiled, vocab_size, set(eos), seed, cap, mask_us)
            ended += done
            leaks += any(t in special or t >= tokenizer.vocab_size for t in tokens)
            text = tokenizer.decode(tokens, skip_special_tokens=False)
            valid += done and check(text)
            valid_lenient += done and lenient(text)
        row[f"{kind}_mask_us_mean"] = statistics.fmean(mask_us)
        row[f"{kind}_mask_us_p99"] = _pct(mask_us, 0.99)
        row[f"{kind}_valid"] = f"{valid}/{walks}" + (f" ({walks - ended} hit cap)" if ended < walks else "")
        if kind == "json":
            row["json_valid_if_control_chars_allowed"] = f"{valid_lenient}/{walks}"
        row[f"{kind}_special_leaks"] = leaks
    return row


def build_synthetic_tokenizer(out_dir: Path, vocab_size: int, seed: int = 0) -> Tokenizer:
    """A byte-level BPE vocabulary of `vocab_size` made-up tokens (words, numbers, JSON punctuation),
    to time masks at a Llama-3-sized vocabulary without downloading one."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    rng = random.Random(seed)
    vocab: dict[str, int] = {}
    numbers = [str(n) for n in range(min(1000, vocab_size // 10))]
    for piece in sorted(alphabet) + numbers + ['",', '":', '{"', '"}', '["', '"]', '":"']:
        vocab.setdefault(piece, len(vocab))
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"
    while len(vocab) < vocab_size - 3:
        word = "".join(rng.choice(letters) for _ in range(rng.randint(2, 10)))
        vocab.setdefault(rng.choice(["", "Ġ", '"', "Ġ\"", "."]) + word, len(vocab))
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"])
    out_dir.mkdir(parents=True, exist_ok=True)
    backend.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|pad|>"}))
    return Tokenizer.from_pretrained(out_dir)


def measure_backend(tokenizer: Tokenizer, walks: int, cap: int) -> dict[str, Any]:
    """tokenmill's own backend: per-token costs of fill_bitmask / accept_token on the nested schema,
    apply_bitmask for a batch, and whether two threads fill masks in parallel (the GIL is released)."""
    from tokenmill.structured import GrammarCompiler, StructuredOutputParams, allocate_bitmask, apply_bitmask
    from tokenmill.structured.backend import fill_bitmasks
    from tokenmill.sample.bitmask import unpack_bitmask

    vocab, eos = tokenizer.vocab_size, tokenizer.eos_token_id
    assert eos is not None
    importlib.import_module("llguidance")  # import time is reported on its own
    start = time.perf_counter()
    compiler = GrammarCompiler(tokenizer, vocab, [eos])
    params = StructuredOutputParams(json=NESTED_SCHEMA)
    compiler.compile(params)
    row: dict[str, Any] = {"lib": f"tokenmill, vocab {vocab}", "first_compile_ms": (time.perf_counter() - start) * 1e3}
    fill_us: list[float] = []
    accept_us: list[float] = []
    bitmask = allocate_bitmask(1, vocab)
    steps: list[tuple[Any, list[int]]] = []
    for seed in range(walks):
        gen, matcher, prefix = torch.Generator().manual_seed(seed), compiler.matcher(params), []
        for _ in range(cap):
            t0 = time.perf_counter()
            matcher.fill_bitmask(bitmask, 0)
            fill_us.append((time.perf_counter() - t0) * 1e6)
            allowed = unpack_bitmask(bitmask, vocab)[0].nonzero().flatten()
            token = int(allowed[torch.randint(len(allowed), (1,), generator=gen)])
            t0 = time.perf_counter()
            matcher.accept_token(token)
            accept_us.append((time.perf_counter() - t0) * 1e6)
            if token == eos:
                break
            prefix.append(token)
            steps.append((params, list(prefix)))
    row.update(fill_us_mean=statistics.fmean(fill_us), fill_us_p50=_pct(fill_us, 0.5), fill_us_p99=_pct(fill_us, 0.99),
               accept_us_mean=statistics.fmean(accept_us))
    # 64 mid-walk states, filled one by one, then as one batch on llguidance's thread pool.
    stride = max(1, len(steps) // 64)
    states = [compiler.matcher(p) for p, _ in steps[::stride][:64]]
    for matcher, (_, prefix) in zip(states, steps[::stride]):
        for token in prefix:
            matcher.accept_token(token)
    big = allocate_bitmask(len(states), vocab)
    row["fill_64_one_by_one_ms"] = _median_ms(lambda: [m.fill_bitmask(big, i) for i, m in enumerate(states)], 5)
    row["fill_64_batched_ms"] = _median_ms(lambda: fill_bitmasks(states, big, range(len(states))), 5)
    for batch in (1, len(states)):  # masks of real mid-walk states, not random bits
        logits = torch.randn(batch, vocab)
        row[f"apply_bitmask_ms_batch{batch}"] = _median_ms(
            functools.partial(apply_bitmask, logits, big[:batch]), repeats=10)
    return row


def _print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n## {title}\n")
    keys = [k for k in rows[0] if k != "lib"]
    print("| measure | " + " | ".join(r["lib"] for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for key in keys:
        cells = [f"{r[key]:.3g}" if isinstance(r[key], float) else str(r[key]) for r in rows]
        print(f"| {key} | " + " | ".join(cells) + " |")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--walks", type=int, default=50, help="random walks per grammar (tiny vocab)")
    parser.add_argument("--cap", type=int, default=400, help="tokens per walk before giving up")
    parser.add_argument("--big-vocab", type=int, default=128_000, help="synthetic vocabulary size; 0 skips it")
    parser.add_argument("--big-walks", type=int, default=5)
    parser.add_argument("--backend-only", action="store_true", help="only time tokenmill's backend (no xgrammar)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    libs: list[type[_Lib]] = [_XGrammar, _LLGuidance]
    with tempfile.TemporaryDirectory() as tmp:
        big = build_synthetic_tokenizer(Path(tmp) / "big", args.big_vocab) if args.big_vocab else None
        if not args.backend_only:
            print("| import seconds | " + " | ".join(f"{m}: {_import_seconds(m):.2f}" for m in ("xgrammar", "llguidance")))
            build_tiny_tokenizer(Path(tmp) / "tiny")
            tiny = Tokenizer.from_pretrained(Path(tmp) / "tiny")
            padded = tiny.vocab_size + 8  # a model whose lm_head is wider than the tokenizer
            _print_table(f"tiny tokenizer ({tiny.vocab_size} tokens, mask width {padded})",
                         [measure(lib, tiny, padded, args.walks, args.cap) for lib in libs])
            if big is not None:
                _print_table(f"synthetic byte-level vocabulary ({big.vocab_size} tokens)",
                             [measure(lib, big, big.vocab_size, args.big_walks, args.cap) for lib in libs])
        sizes = [build_synthetic_tokenizer(Path(tmp) / "small", 1000)] + ([big] if big is not None else [])
        _print_table("tokenmill backend (llguidance), nested schema",
                     [measure_backend(t, args.big_walks * 2, args.cap) for t in sizes])


if __name__ == "__main__":
    main()
