"""Asynchronous scheduling on the engine's side: step n+1 is planned and submitted before step n's results
are applied, so the host's work on step n (scheduler update, detokenizing, outputs) overlaps step n+1.

    planned = PlannedSteps(scheduler, worker.execute)
    result = planned.next_result(plan_ahead=...)   # (step n, its ModelRunnerOutput), n+1 already running

The one rule for when a step may not be planned ahead is `plan_ahead_blocker`: then the engine applies step
n before it schedules n+1, exactly as the synchronous engine does (the scheduler's accounting is the same).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future

from tokenmill.core.request import Request
from tokenmill.core.sched_io import ModelRunnerOutput, SchedulerOutput
from tokenmill.core.scheduler import Scheduler
from tokenmill.worker.async_step import StepThread

logger = logging.getLogger(__name__)


def run_blocker(speculative: bool) -> str | None:
    """Why a whole run cannot plan ahead (None: it can). Drafts for step n+1 come from step n's results."""
    return "speculative decoding proposes step n+1's drafts from step n's tokens" if speculative else None


def plan_ahead_blocker(requests: Iterable[Request]) -> str | None:
    """Why the next step cannot be planned before the current one's results (None: it can).

    A grammar-constrained request's matcher must see its stop before another mask is asked of it, so while
    one is live the engine steps synchronously. Everything else the worker needs (penalties, logprobs,
    min_tokens, thinking budgets, per-request seeds) it keeps itself and updates in step order."""
    for request in requests:
        if request.sampling_params.structured_outputs is not None:
            return f"request {request.request_id!r} is grammar-constrained"
    return None


class PlannedSteps:
    """At most one step in flight ahead of the one whose results the engine is applying."""

    def __init__(self, scheduler: Scheduler, execute: Callable[[SchedulerOutput], ModelRunnerOutput]) -> None:
        self.scheduler = scheduler
        self.thread = StepThread(execute)
        self.in_flight: deque[tuple[SchedulerOutput, Future[ModelRunnerOutput]]] = deque()

    def next_result(self, plan_ahead: bool, prev_step_seconds: float | None
                    ) -> tuple[SchedulerOutput, ModelRunnerOutput] | None:
        """Step n's plan and results (None when there was nothing to run). Step n is scheduled now if it is not
        in flight yet; with plan_ahead step n+1 is scheduled and submitted before step n is waited for."""
        if not self.in_flight:
            self._submit(prev_step_seconds)
        if not self.in_flight:
            return None
        if plan_ahead:
            self._submit(prev_step_seconds)
        step, handle = self.in_flight.popleft()
        try:
            return step, handle.result()
        except BaseException:
            self._abandon(step)
            raise

    def _submit(self, prev_step_seconds: float | None) -> None:
        step = self.scheduler.schedule()
        step.prev_step_seconds = prev_step_seconds
        handle = self.thread.submit(step)
        if step.is_empty:
            handle.result()  # nothing to apply; the worker has dropped finished requests' state
        else:
            self.in_flight.append((step, handle))

    def _abandon(self, failed: SchedulerOutput) -> None:
        """Step n raised: wait for the step planned after it and undo both plans, so the scheduler stands as if
        neither had been scheduled (the engine's caller decides what to do with the requests)."""
        steps = [failed]
        for step, handle in self.in_flight:
            steps.append(step)
            if handle.exception() is not None:
                logger.warning("a step planned after a failed one failed too: %r", handle.exception())
        self.in_flight.clear()
        self.scheduler.discard_plans(steps)

    def close(self) -> None:
        for _, handle in self.in_flight:
            handle.exception()  # wait; its results are not wanted any more
        self.in_flight.clear()
        self.thread.close()
