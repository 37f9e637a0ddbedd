"""Asynchronous scheduling on the worker's side: its steps run on one background thread, in order.

The engine submits step n+1 (planned before step n's tokens were known) and applies step n's results on its
own thread while the step thread runs n+1; torch releases the GIL inside its ops, so the two overlap on a CPU
too. One thread keeps the steps in submission order, which is what makes placeholders work: when step n+1
is prepared, step n has sampled, and each request's last token is on the device (InputBatch.record_sampled).
It also keeps the pinned host buffers safe: step n's ids are read before step n+1's inputs are written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

from tokenmill.core.sched_io import ModelRunnerOutput, ScheduledChunk, SchedulerOutput
from tokenmill.worker.input_batch import InputBatch
from tokenmill.worker.request_failures import RequestFailures

# What a request that failed in an earlier step reports when a step planned before that failure was known
# still carries it (the engine has ended the request by then and discards this).
FAILED_EARLIER = "this request failed in an earlier step"


class StepThread:
    """Runs `execute` for each submitted step on one thread, in submission order."""

    def __init__(self, execute: Callable[[SchedulerOutput], ModelRunnerOutput]) -> None:
        self._execute = execute
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenmill-step")

    def submit(self, scheduler_output: SchedulerOutput) -> Future[ModelRunnerOutput]:
        """A handle that resolves to the step's ModelRunnerOutput (or raises what the step raised)."""
        return self._pool.submit(self._execute, scheduler_output)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def record_last_tokens(input_batch: InputBatch, chunks: Sequence[ScheduledChunk], sampled: Sequence[list[int]]) -> None:
    """Keep each request's last sampled token on the device, for a placeholder in its next step."""
    pairs = [(chunk.req_id, tokens[-1]) for chunk, tokens in zip(chunks, sampled) if tokens]
    if pairs:
        req_ids, tokens = zip(*pairs)
        input_batch.record_sampled(list(req_ids), list(tokens))


def without_failed_earlier(step: SchedulerOutput, failed_earlier: dict[str, tuple[str | None, str]],
                           failures: RequestFailures) -> SchedulerOutput:
    """The step less the requests that failed in the worker's previous step. Only a step planned before that
    failure reached the engine carries them (the engine ends such a request when it applies the failure), so
    they are left out whole (no model pass that fails again, no state they may lack) and reported failed."""
    # An id both finished and scheduled again belongs to a new request that reuses it.
    left_out = {req_id for req_id in failed_earlier if req_id not in step.finished_req_ids}
    if not left_out or not any(chunk.req_id in left_out for chunk in step.chunks):
        return step
    for chunk in step.chunks:
        if chunk.req_id in left_out:
            failures.failed.setdefault(chunk.req_id, (None, FAILED_EARLIER))
    return replace(step, chunks=[chunk for chunk in step.chunks if chunk.req_id not in left_out])
