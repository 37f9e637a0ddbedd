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

from collections.abc import Container, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol

import torch

from tokenmill.core.sched_io import ScheduledChunk
from tokenmill.sample.bitmask import allocate_bitmask


class GrammarMatcherLike(Protocol):
    def accept_token(self, token_id: int) -> bool: ...


class GrammarBackend(Protocol):
    def matcher(self, params: Any) -> GrammarMatcherLike:
        """A fresh matcher for a request's structured-output parameters."""

    def fill_bitmasks(self, matchers: Sequence[GrammarMatcherLike], bitmask: torch.Tensor, rows: Sequence[int],
                      parallel: bool) -> None:
        """Fill bitmask row rows[i] with the tokens matchers[i] allows next."""


class MaskResult(NamedTuple):
    bitmask: torch.Tensor
    failed: dict[int, Exception]  # row -> why that row's matcher could not fill its mask


class GrammarMasks:
    def __init__(self, backend: GrammarBackend, vocab_size: int, overlap: bool = True) -> None:
        self.backend = backend
        self.vocab_size = vocab_size
        self.overlap = overlap  # False when the model runs on the CPU (see the module docstring)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenmill-grammar") if overlap else None

    def start(self, matchers: list[GrammarMatcherLike]) -> Future[MaskResult] | None:
        """Begin filling one bitmask row per matcher (in order); None when there are none."""
        if not matchers:
            return None

        def fill() -> MaskResult:
            bitmask = allocate_bitmask(len(matchers), self.vocab_size)
            return MaskResult(bitmask, self._fill_attributed(matchers, bitmask))

        if self._executor is not None:
            return self._executor.submit(fill)
        done: Future[MaskResult] = Future()
        done.set_result(fill())
        return done

    def _fill_attributed(self, matchers: list[GrammarMatcherLike], bitmask: torch.Tensor) -> dict[int, Exception]:
        """Fill every row; when the batch fill raises, refill row by row to learn whose grammar failed.

        A failing row is one request's problem (a grammar too costly to match): it must not cost the others
        their masks, so the failure is returned per row instead of raised."""
        try:
            self.backend.fill_bitmasks(matchers, bitmask, list(range(len(matchers))), parallel=self.overlap)
            return {}
        except Exception:  # noqa: BLE001 - attributed below
            pass
        failed: dict[int, Exception] = {}
        for row, matcher in enumerate(matchers):
            try:
                self.backend.fill_bitmasks([matcher], bitmask, [row], parallel=False)
            except Exception as error:  # noqa: BLE001 - reported against this row's request
                failed[row] = error
        return failed


def without_failed_rows(chunks: list[ScheduledChunk], plain: list[tuple[int, int]], mask: Any,
                        failures: Container[str]) -> tuple[list[tuple[int, int]], Any]:
    """`plain` without the requests that failed, and the mask's rows renumbered to match (None when empty)."""
    kept = [i for i, (c, _) in enumerate(plain) if chunks[c].req_id not in failures]
    if len(kept) == len(plain):
        return plain, mask
    if mask is not None:
        new_index = {old: new for new, old in enumerate(kept)}
        bitmask, rows = mask
        mask_rows = [j for j, row in enumerate(rows) if row in new_index]
        mask = (bitmask[mask_rows], [new_index[rows[j]] for j in mask_rows]) if mask_rows else None
    return [plain[i] for i in kept], mask
