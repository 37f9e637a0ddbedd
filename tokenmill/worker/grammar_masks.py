"""Structured-output token masks, computed on a background thread while the model runs.

The grammar matchers already know every token up to this step, so the next token's mask does not depend
on the forward pass: start filling it before the model runs and apply it to the logits afterwards.

That overlap pays when the model runs on a GPU and the CPU would otherwise wait. When the model runs on the
CPU, torch already keeps every core busy: a mask thread beside it slowed the forward pass itself by ~6% at
batch 32 on 2 cores (measured, docs/perf.md), more than filling the masks costs (~0.5 ms a step). So on
the CPU the masks are filled inline, one row after another, before the forward pass.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch


class GrammarMasks:
    def __init__(self, vocab_size: int, overlap: bool = True) -> None:
        self.vocab_size = vocab_size
        self.overlap = overlap  # False when the model runs on the CPU (see the module docstring)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenmill-grammar") if overlap else None

    def start(self, matchers: list[Any]) -> Future[torch.Tensor] | None:
        """Begin filling one bitmask row per matcher (in order); None when there are none."""
        if not matchers:
            return None
        from tokenmill.structured import allocate_bitmask, fill_bitmasks

        def fill() -> torch.Tensor:
            bitmask = allocate_bitmask(len(matchers), self.vocab_size)
            fill_bitmasks(matchers, bitmask, list(range(len(matchers))), parallel=self.overlap)
            return bitmask

        if self._executor is not None:
            return self._executor.submit(fill)
        done: Future[torch.Tensor] = Future()
        try:
            done.set_result(fill())
        except Exception as error:  # raised where an overlapped fill would raise: at apply()
            done.set_exception(error)
        return done

    @staticmethod
    def apply(pending: Future[torch.Tensor], logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """A copy of logits with disallowed tokens at -inf in `rows` (bitmask row i masks rows[i])."""
        from tokenmill.structured import apply_bitmask

        bitmask = pending.result()
        masked = logits.clone()
        grammar_rows = masked[rows]
        apply_bitmask(grammar_rows, bitmask)
        masked[rows] = grammar_rows
        return masked
