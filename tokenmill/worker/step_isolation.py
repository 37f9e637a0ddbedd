"""Which request makes a failing step fail: bisect the step's requests, re-running the model on subsets.

When the model pass of a step raises and no request's own work is to blame, the failure may still be one
request's doing (an input that trips a kernel bug, a shape nothing else in the batch has). Failing the whole
batch for it would let one client end every other client's request, so the worker re-runs the step's
requests in halves, descending into every half that still fails, until single requests remain. A re-run is
safe: a step only writes KV slots at positions its requests have not computed yet, in blocks no other request
shares, so a probe writes what the real step will write again (and a failed probe leaves slots that are
overwritten before anything reads them). Sampling state is touched only after the model pass, so probes
leave it alone.

The search is bounded (`max_probes` model passes): a failure that needs the whole batch (memory for the
combined shape) or that every request hits (a broken device) is not one request's fault, and the caller
then fails the step as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

from tokenmill.core.sched_io import ModelRunnerOutput, SchedulerOutput
from tokenmill.worker.request_failures import RequestFailures

logger = logging.getLogger(__name__)

# Enough to find two culprits among 64 requests; a probe runs at most half the step.
MAX_ISOLATION_PROBES = 24


class UnattributedFailure(Exception):
    """The step's failure could not be pinned on single requests within the probe budget."""


def find_failing_requests(req_ids: Sequence[str], probe: Callable[[list[str]], BaseException | None],
                          max_probes: int = MAX_ISOLATION_PROBES) -> dict[str, BaseException]:
    """Request ids whose presence alone makes the model pass fail, each with the error its own pass raised.

    `req_ids` all failed together; `probe(subset)` runs the model on just that subset and returns the error
    it raised (None when it succeeded). Raises UnattributedFailure when some failing group has no failing
    half (the failure needs the combination) or the probe budget runs out."""
    culprits: dict[str, BaseException] = {}
    probes_left = max_probes

    def descend(group: list[str]) -> None:
        """`group` (two or more requests) fails together: probe its halves, descend into those that fail."""
        nonlocal probes_left
        middle = len(group) // 2
        any_failed = False
        for half in (group[:middle], group[middle:]):
            if probes_left == 0:
                raise UnattributedFailure(f"no culprit found within {max_probes} probes")
            probes_left -= 1
            half_error = probe(half)
            if half_error is not None:
                any_failed = True
                if len(half) == 1:
                    culprits[half[0]] = half_error
                else:
                    descend(half)
        if not any_failed:
            raise UnattributedFailure(f"{len(group)} requests fail together but no half of them fails alone")

    if not req_ids:
        raise UnattributedFailure("a step without requests failed")
    if len(req_ids) == 1:
        # Nothing to compare a lone request with: its failure may as well be the engine's.
        raise UnattributedFailure("the step had a single request")
    descend(list(req_ids))
    if len(culprits) == len(req_ids):
        raise UnattributedFailure("every request fails on its own: not one request's doing")
    return culprits


def without_failing_requests(step: SchedulerOutput, failures: RequestFailures,
                             model_pass: Callable[[SchedulerOutput], None], step_error: Exception) -> SchedulerOutput:
    """The step less the requests whose presence makes its model pass fail, each recorded in `failures` with
    its own error. `model_pass(subset)` runs the model on a subset of the step's chunks (raising what the
    pass raises). When no single request is to blame, `step_error` is raised again: the step fails whole."""
    by_id = {chunk.req_id: chunk for chunk in step.chunks}

    def probe(req_ids: list[str]) -> BaseException | None:
        try:
            model_pass(SchedulerOutput(chunks=[by_id[req_id] for req_id in req_ids]))
        except Exception as exc:  # noqa: BLE001 - the probe's answer
            return exc
        return None

    try:
        culprits = find_failing_requests([req_id for req_id in by_id if req_id not in failures], probe)
    except UnattributedFailure as why:
        logger.warning("a step of %d requests failed and no single request causes it (%s)", len(by_id), why)
        raise step_error from None
    logger.warning("a step of %d requests failed because of %d of them; running it without them",
                   len(by_id), len(culprits))
    for req_id, error in culprits.items():
        failures.record(req_id, error)
    return replace(step, chunks=[chunk for chunk in step.chunks if chunk.req_id not in failures])


def aligned_output(scheduled: SchedulerOutput, output: ModelRunnerOutput) -> ModelRunnerOutput:
    """The output of a step run without some of its requests, one entry per scheduled chunk again (the
    scheduler pairs chunks with results by position); the requests left out sampled nothing."""
    sampled = dict(zip(output.req_ids, output.sampled_token_ids))
    output.req_ids = [chunk.req_id for chunk in scheduled.chunks]
    output.sampled_token_ids = [sampled.get(chunk.req_id, []) for chunk in scheduled.chunks]
    return output
