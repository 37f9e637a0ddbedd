"""Grammar compilation (one compiler per engine, LRU-cached) and per-request matchers that fill token masks.

Built on llguidance (see docs/structured_output.md for why). EOS is handled here rather than inside
llguidance: the mask allows the EOS ids exactly when the grammar may end, accepting one terminates
the matcher, and a terminated matcher allows only EOS.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from types import ModuleType
from typing import Any

import torch

from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.errors import InvalidRequestError
from tokenmill.sample.bitmask import allocate_bitmask, bitmask_width
from tokenmill.structured.deep_stack import DeepStackPool
from tokenmill.structured.llg_grammar import compile_template, import_llguidance
from tokenmill.structured.params import StructuredOutputParams

# Compiled grammars kept per engine. An entry is a parser plus the lexer states built so far: about
# 0.2 MB for a nested schema (measured), so a full cache is some 50 MB. Repeated schemas (one per tool
# or API client) stay warm.
DEFAULT_CACHE_SIZE = 256
# Wall time one grammar may take to compile, build its first mask and take its first token. The work itself is
# bounded by llguidance's fuel (below); this is the backstop a client cannot push past on a loaded machine.
# Real schemas take milliseconds.
DEFAULT_COMPILE_BUDGET_S = 1.0
# llguidance's fuel for building a grammar's lexer (its first mask): the work a compile may do before it is
# cut short. Its default (1,000,000) let `x{1000}{1000}` run 1.2-4.7 s on a 2-core machine before failing
# anyway; a fifth of it stops that in 0.2-0.6 s and still builds real lexemes (`x{30000}` needs ~100,000).
INITIAL_LEXER_FUEL = 200_000
# Tokens a new grammar is walked before it is accepted: far enough into its first lexemes (a JSON string's
# pattern starts after the quote) that one too costly to match is refused before the request is queued.
PROBED_TOKENS = 8
# Compiles that run at once, process-wide: as many as the async engine prepares requests at once.
COMPILE_THREADS = 4
# Grammars refused for their cost are remembered (bounded) so a client repeating one pays nothing again.
MAX_REFUSED = 1024


class CompiledGrammar:
    """A compiled grammar for one tokenizer. Immutable once built; shared by every request that uses it."""

    def __init__(self, kind: str, error_field: str, template: Any, vocab_size: int,
                 eos_token_ids: frozenset[int]) -> None:
        self.kind = kind
        self.error_field = error_field
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self._template = template  # an llguidance matcher at the start state; only ever copied

    def new_matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self)


class GrammarMatcher:
    """One request's position in its grammar: accepts sampled tokens and fills the next token mask.

    Not thread-safe on its own: use one matcher from one thread at a time. Different matchers may run
    on different threads at once; fill_bitmasks fills a batch on llguidance's pool without the GIL.
    """

    def __init__(self, compiled: CompiledGrammar) -> None:
        self._compiled = compiled
        self._llm = compiled._template.deep_copy()  # a copy costs ~1 us; building a matcher ~400 us
        self._eos = compiled.eos_token_ids
        self._width = bitmask_width(compiled.vocab_size)
        self._num_consumed = 0  # tokens llguidance has consumed (EOS is never passed to it)
        self._terminated = False

    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token. False (and no state change) when the grammar does not allow it."""
        if self._terminated:
            return False
        if token_id in self._eos:
            if not self._llm.is_accepting():
                return False
            self._terminated = True
            return True
        if not 0 <= token_id < self._compiled.vocab_size:
            return False
        # try_consume stops before a token the grammar refuses and leaves no error state behind,
        # unlike consume_token, which would poison the matcher.
        if self._llm.try_consume_tokens([token_id]) != 1:
            self._raise_if_failed()
            return False
        self._num_consumed += 1
        return True

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (a CPU int32 mask from allocate_bitmask)."""
        _check_bitmask(bitmask, self._width, self._compiled.vocab_size)
        if not 0 <= row < bitmask.shape[0]:
            raise IndexError(f"row {row} out of range for a bitmask of {bitmask.shape[0]} rows")
        target = bitmask[row]
        if self._terminated:
            self._fill_finished(target)
            return
        self._llm.unsafe_compute_mask_ptr(target.data_ptr(), self._width * 4)
        self._raise_if_failed()

    def _fill_finished(self, target: torch.Tensor) -> None:
        # The request is over; leave the sampler something finite to pick rather than an all -inf row.
        target.zero_()
        _set_bits(target, self._eos)

    def is_terminated(self) -> bool:
        """The grammar is complete and an EOS token was accepted."""
        return self._terminated

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (rejected speculative drafts), EOS included."""
        if not 0 <= num_tokens <= self._num_consumed + self._terminated:
            raise ValueError(f"cannot roll back {num_tokens} tokens: only "
                             f"{self._num_consumed + self._terminated} were accepted")
        if num_tokens and self._terminated:
            self._terminated = False
            num_tokens -= 1
        if num_tokens:
            if not self._llm.rollback(num_tokens):
                raise RuntimeError(f"llguidance could not roll back {num_tokens} tokens: {self._llm.get_error()}")
            self._num_consumed -= num_tokens

    def num_valid_prefix(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens accept_token would take in a row; the state is left as it was."""
        if self._terminated:
            return 0
        plain: list[int] = []
        for token in token_ids:
            if token in self._eos or not 0 <= token < self._compiled.vocab_size:
                break
            plain.append(int(token))
        # Consume-then-roll-back takes the very path accept_token takes, so the count cannot disagree.
        consumed = self._llm.try_consume_tokens(plain) if plain else 0
        valid = consumed
        if consumed == len(plain) < len(token_ids) and token_ids[consumed] in self._eos and self._llm.is_accepting():
            valid += 1  # an EOS the grammar allows here ends the request; nothing after it counts
        if consumed and not self._llm.rollback(consumed):
            raise RuntimeError(f"llguidance could not roll back {consumed} tokens: {self._llm.get_error()}")
        self._raise_if_failed()
        return valid

    def _raise_if_failed(self) -> None:
        # Only resource limits (a grammar too costly to match) reach here; the request cannot go on.
        if self._llm.is_error():
            detail = self._llm.get_error().replace("<non-verbose/>", "").strip()  # the rest quotes no input
            raise InvalidRequestError(self._compiled.error_field, f"the grammar could not be matched (it is over "
                                      f"the matcher's limits; simplify it): {detail}")


_executor: Any = None
_executor_lock = threading.Lock()


def fill_bitmasks(matchers: Sequence[GrammarMatcher], bitmask: torch.Tensor, rows: Sequence[int],
                  parallel: bool = True) -> None:
    """fill_bitmask for many matchers at once: matchers[i] fills bitmask[rows[i]]. Each matcher must appear once.

    With `parallel`, llguidance computes the masks on its own thread pool without holding the GIL: right
    when the model runs on a GPU and the CPU cores are idle. When the model itself runs on the CPU, that
    pool's threads compete with torch's for the same cores and slowed decoding by ~9% at batch 32 (measured,
    docs/perf.md); `parallel=False` fills the rows one after another on the calling thread instead.
    """
    if len(matchers) != len(rows):
        raise ValueError(f"{len(matchers)} matchers but {len(rows)} rows")
    if not matchers:
        return
    width, vocab_size = matchers[0]._width, matchers[0]._compiled.vocab_size
    _check_bitmask(bitmask, width, vocab_size)
    if not bitmask.is_contiguous():
        raise ValueError("bitmask must be contiguous")
    work = []
    for matcher, row in zip(matchers, rows):
        if matcher._width != width:
            raise ValueError("all matchers must come from compilers with the same vocab_size")
        if not 0 <= row < bitmask.shape[0]:
            raise IndexError(f"row {row} out of range for a bitmask of {bitmask.shape[0]} rows")
        if matcher._terminated:
            matcher._fill_finished(bitmask[row])
        else:
            work.append((matcher._llm, int(row)))
    if work and not parallel:
        for llm, row in work:
            llm.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), width * 4)
    elif work:
        _get_executor().unsafe_compute_mask_ptr(work, bitmask.data_ptr(), width * 4, bitmask.shape[0])
    for matcher in matchers:
        matcher._raise_if_failed()


_compile_threads: DeepStackPool | None = None


def _compile_pool() -> DeepStackPool:
    """The process's deep-stack threads for llguidance compiles (structured/deep_stack.py), made on first use."""
    global _compile_threads
    with _executor_lock:
        if _compile_threads is None:
            _compile_threads = DeepStackPool(COMPILE_THREADS, "tokenmill-grammar-compile")
        return _compile_threads


def _get_executor() -> Any:
    global _executor
    with _executor_lock:
        if _executor is None:
            import llguidance  # already loaded: a matcher exists only after a compile imported it

            _executor = llguidance.LLExecutor()  # threads: 80% of the CPUs, at most 32 (llguidance's default)
        return _executor


def _check_bitmask(bitmask: torch.Tensor, width: int, vocab_size: int) -> None:
    if bitmask.dtype != torch.int32 or bitmask.dim() != 2 or bitmask.device.type != "cpu":
        raise ValueError(f"bitmask must be a 2-D int32 CPU tensor, got {bitmask.dtype} {tuple(bitmask.shape)} "
                         f"on {bitmask.device}")
    if bitmask.shape[1] != width or bitmask.stride(1) != 1:
        raise ValueError(f"bitmask rows must be {width} contiguous words for vocab_size {vocab_size}, "
                         f"got shape {tuple(bitmask.shape)}")


def _first_allowed_token(row: torch.Tensor, skip: frozenset[int]) -> int | None:
    """The lowest token id a bitmask row allows, other than those in `skip` (None when there is none)."""
    for word in torch.nonzero(row).flatten().tolist():
        bits = int(row[word]) & 0xFFFFFFFF
        while bits:
            low = bits & -bits
            token = word * 32 + low.bit_length() - 1
            if token not in skip:
                return token
            bits ^= low
    return None


def _set_bits(row: torch.Tensor, token_ids: frozenset[int]) -> None:
    for token in token_ids:
        word, bit = divmod(token, 32)
        value = int(row[word]) | (1 << bit)
        row[word] = value - (1 << 32) if value >= 1 << 31 else value  # back into int32's signed range


class GrammarCompiler:
    """Compiles StructuredOutputParams for one tokenizer; one per engine, safe to call from any thread.

    vocab_size is the model's logits width; ids from the tokenizer's size up to it (padding rows of
    the lm_head) are never allowed. llguidance is imported, and its view of the tokenizer built
    (~5 ms for 500 tokens, ~0.7 s for 128k), on the first compile: an engine that expects structured
    requests can compile a trivial one at start-up to pay this early.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int],
                 cache_size: int = DEFAULT_CACHE_SIZE, compile_budget_s: float = DEFAULT_COMPILE_BUDGET_S) -> None:
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        eos = frozenset(int(t) for t in eos_token_ids)
        if not eos or not all(0 <= t < vocab_size for t in eos):
            raise ValueError(f"eos_token_ids must be non-empty ids below vocab_size {vocab_size}, got "
                             f"{list(eos_token_ids)}")
        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, got {cache_size}")
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = eos
        self._cache_size = cache_size
        self._cache: OrderedDict[Hashable, CompiledGrammar] = OrderedDict()
        self._refused: OrderedDict[Hashable, InvalidRequestError] = OrderedDict()
        self._budget_s = compile_budget_s
        self._compiling: dict[Hashable, threading.Event] = {}  # keys being compiled right now
        self._lock = threading.Lock()
        self._llg: ModuleType | None = None
        self._lltokenizer: Any = None
        self._limits: Any = None
        self.hits = 0
        self.misses = 0

    def compile(self, params: StructuredOutputParams) -> CompiledGrammar:
        """The compiled grammar for `params`, from the cache when an equal request compiled it before.

        The lock guards only the cache: a compile runs outside it, so a slow grammar delays only requests
        for that same grammar (they wait for its one compile), never cache hits or other grammars."""
        key = params.cache_key()  # validates: bad option combinations fail before any import
        while True:
            with self._lock:
                cached = self._cache.get(key)
                if cached is not None:
                    self._cache.move_to_end(key)
                    self.hits += 1
                    return cached
                refused = self._refused.get(key)
                if refused is not None:
                    raise refused
                llg = self._library(params.error_field)
                in_flight = self._compiling.get(key)
                if in_flight is None:
                    self._compiling[key] = threading.Event()
                    break
            in_flight.wait()  # another thread compiles this grammar: then read its result from the cache
        try:
            compiled = _compile_pool().run(self._compile_checked, llg, key, params)
            with self._lock:
                self.misses += 1
                self._cache[key] = compiled
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            return compiled
        finally:
            with self._lock:
                self._compiling.pop(key).set()

    def _compile_checked(self, llg: ModuleType, key: Hashable, params: StructuredOutputParams) -> CompiledGrammar:
        """Compile and check the cost (on a deep-stack thread: llguidance recurses once per grammar level)."""
        started = time.perf_counter()
        template = compile_template(llg, self._lltokenizer, params, self._limits)
        compiled = CompiledGrammar(params.kind, params.error_field, template, self._vocab_size, self._eos)
        self._check_cost(key, compiled, time.perf_counter() - started)
        return compiled

    def _check_cost(self, key: Hashable, compiled: CompiledGrammar, compile_s: float) -> None:
        """Build the first masks and walk a few tokens now (llguidance builds its lexer lazily, so a lexeme
        too costly to match fails only when it is first used) and hold the total to the budget.

        Errors that would otherwise surface in the first engine steps (a lexer over its limits) surface here,
        as this request's 400, before it is queued."""
        started = time.perf_counter()
        probe = compiled.new_matcher()
        error: InvalidRequestError | None = None
        try:
            mask = allocate_bitmask(1, self._vocab_size)
            for _ in range(PROBED_TOKENS):  # the lowest allowed token each time: a walk into the first lexemes
                probe.fill_bitmask(mask, 0)
                token = _first_allowed_token(mask[0], self._eos)
                if token is None or not probe.accept_token(token):  # accept_token raises if the lexer gives up
                    break
        except InvalidRequestError as e:
            error = e
        elapsed = compile_s + time.perf_counter() - started
        if error is None and elapsed > self._budget_s:
            error = InvalidRequestError(compiled.error_field, f"the grammar took {elapsed:.2f} s to compile, over "
                                        f"the budget of {self._budget_s:g} s; simplify it")
        if error is not None:
            with self._lock:
                self._refused[key] = error
                if len(self._refused) > MAX_REFUSED:
                    self._refused.popitem(last=False)
            raise error

    def matcher(self, params: StructuredOutputParams) -> GrammarMatcher:
        """A new matcher at the start of the request's grammar."""
        return self.compile(params).new_matcher()

    def fill_bitmasks(self, matchers: Sequence[GrammarMatcher], bitmask: torch.Tensor, rows: Sequence[int],
                      parallel: bool = True) -> None:
        """The worker's GrammarBackend view of the module-level fill_bitmasks."""
        fill_bitmasks(matchers, bitmask, rows, parallel)

    def cache_info(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "size": len(self._cache), "max_size": self._cache_size}

    def _library(self, field: str) -> ModuleType:
        """llguidance and its tokenizer view, made on first use (the caller holds the lock)."""
        if self._llg is not None:
            return self._llg
        llg = import_llguidance(field)
        tokenizer_size = self._tokenizer.vocab_size
        if self._vocab_size < tokenizer_size:
            raise InvalidRequestError(
                field, f"structured output is not supported for this model: its logits cover {self._vocab_size} "
                f"ids but its tokenizer has {tokenizer_size}")
        # The tokenizer.json text (added tokens included) lets llguidance find each token's bytes and
        # which tokens are special; special tokens other than EOS are then never allowed in output.
        self._lltokenizer = llg.LLTokenizer(_tokenizer_json(self._tokenizer), n_vocab=self._vocab_size,
                                            eos_token=sorted(self._eos))
        # Short error messages: the default ones dump the parser state and the whole grammar.
        self._limits = llg.LLParserLimits(verbose_errors=False, initial_lexer_fuel=INITIAL_LEXER_FUEL)
        self._llg = llg
        return llg


def _tokenizer_json(tokenizer: Tokenizer) -> str:
    # tokenmill's Tokenizer keeps the `tokenizers` object private; its serialized form is what
    # llguidance reads. Padding and truncation would change how llguidance re-tokenizes, so drop them.
    spec = json.loads(tokenizer._tok.to_str())
    spec["padding"] = None
    spec["truncation"] = None
    return json.dumps(spec)
