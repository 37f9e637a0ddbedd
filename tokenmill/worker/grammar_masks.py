"""Structured-output token masks, filled before (CPU) or while (GPU) the model runs.

The grammar matchers already know every token up to this step, so the next token's mask does not depend
on the forward pass: start filling it before the model runs and apply it to the logits afterwards.

That overlap pays when the model runs on a GPU and the CPU would otherwise wait. When the model runs on the
CPU, torch already keeps every core busy: a mask thread beside it slowed the forward pass itself by ~6% at
batch 32 on 2 cores (measured, docs/perf.md), more than filling the masks costs (~0.5 ms a step). So on
the CPU the masks are filled inline, one row after another, before the forward pass.

The grammar library lives in `tokenmill.structured`; the worker sees it only through `GrammarBackend`.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import torch

from tokenmill.sample.bitmask import allocate_bitmask


class GrammarMatcherLike(Protocol):
    def accept_token(self, token_id: int) -> bool: ...


class GrammarBackend(Protocol):
    def matcher(self, params: Any) -> GrammarMatcherLike:
        """A fresh matcher for a request's structured-output parameters."""

    def fill_bitmasks(self, matchers: Sequence[GrammarMatcherLike], bitmask: torch.Tensor, rows: Sequence[int],
                      parallel: bool) -> None:
        """Fill bitmask row rows[i] with the tokens matchers[i] allows next."""


class GrammarMasks:
    def __init__(self, backend: GrammarBackend, vocab_size: int, overlap: bool = True) -> None:
        self.backend = backend
        self.vocab_size = vocab_size
        self.overlap = overlap  # False when the model runs on the CPU (see the module docstring)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenmill-grammar") if overlap else None

    def start(self, matchers: list[GrammarMatcherLike]) -> Future[torch.Tensor] | None:
        """Begin filling one bitmask row per matcher (in order); None when there are none."""
        if not matchers:
            return None

        def fill() -> torch.Tensor:
            bitmask = allocate_bitmask(len(matchers), self.vocab_size)
            self.backend.fill_bitmasks(matchers, bitmask, list(range(len(matchers))), parallel=self.overlap)
            return bitmask

        if self._executor is not None:
            return self._executor.submit(fill)
        done: Future[torch.Tensor] = Future()
        try:
            done.set_result(fill())
        except Exception as error:  # raised where an overlapped fill would raise: when the mask is used
            done.set_exception(error)
        return done
