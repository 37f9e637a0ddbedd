"""Finding the request whose presence makes a step fail: bisection over the step's requests, bounded."""

from __future__ import annotations

import pytest

from tokenmill.core.sched_io import ModelRunnerOutput, ScheduledChunk, SchedulerOutput
from tokenmill.worker.request_failures import RequestFailures
from tokenmill.worker.step_isolation import (MAX_ISOLATION_PROBES, UnattributedFailure, aligned_output,
                                             find_failing_requests, without_failing_requests)


def _poisoned_by(*poison: str):
    probes: list[list[str]] = []

    def probe(req_ids: list[str]) -> BaseException | None:
        probes.append(req_ids)
        bad = [r for r in req_ids if r in poison]
        return RuntimeError(f"poisoned by {bad[0]}") if bad else None

    return probe, probes


@pytest.mark.parametrize("num_requests", [2, 3, 13, 64])
def test_one_poison_is_found_in_about_two_log_n_probes(num_requests):
    ids = [f"r{i}" for i in range(num_requests)]
    poison = ids[num_requests // 3]
    probe, probes = _poisoned_by(poison)
    culprits = find_failing_requests(ids, probe)
    assert list(culprits) == [poison] and str(culprits[poison]) == f"poisoned by {poison}"
    assert len(probes) <= 2 * (num_requests - 1).bit_length()
    assert all(len(p) <= (num_requests + 1) // 2 for p in probes)  # never the whole failing step again


def test_two_poisons_are_both_found():
    ids = [f"r{i}" for i in range(16)]
    probe, _ = _poisoned_by("r2", "r11")
    assert set(find_failing_requests(ids, probe)) == {"r2", "r11"}


def test_a_failure_that_needs_the_whole_batch_is_nobodys():
    def probe(req_ids: list[str]) -> BaseException | None:  # e.g. out of memory only at the full size
        return MemoryError() if len(req_ids) > 8 else None

    with pytest.raises(UnattributedFailure, match="no half"):
        find_failing_requests([f"r{i}" for i in range(10)], probe)


def test_a_failure_every_request_hits_is_nobodys():
    with pytest.raises(UnattributedFailure, match="every request"):
        find_failing_requests(["a", "b", "c"], lambda ids: RuntimeError("device lost"))


def test_a_lone_request_is_not_blamed():
    with pytest.raises(UnattributedFailure, match="single request"):
        find_failing_requests(["a"], lambda ids: RuntimeError())


def test_the_probe_budget_bounds_the_search():
    calls: list[list[str]] = []

    def probe(req_ids: list[str]) -> BaseException | None:
        calls.append(req_ids)
        return RuntimeError() if any(int(r[1:]) % 2 == 0 for r in req_ids) else None  # half are culprits

    with pytest.raises(UnattributedFailure, match="probes"):
        find_failing_requests([f"r{i}" for i in range(256)], probe)
    assert len(calls) == MAX_ISOLATION_PROBES


def _chunk(req_id: str) -> ScheduledChunk:
    return ScheduledChunk(req_id, [1], 0, [0], sample=True)


def test_the_step_runs_without_the_poison_which_gets_its_own_error():
    step = SchedulerOutput(chunks=[_chunk("a"), _chunk("poison"), _chunk("b")], num_waiting=3)

    def model_pass(subset: SchedulerOutput) -> None:
        if any(c.req_id == "poison" for c in subset.chunks):
            raise RuntimeError("secret text from the poison's input")

    failures = RequestFailures()
    kept = without_failing_requests(step, failures, model_pass, RuntimeError("the step"))
    assert [c.req_id for c in kept.chunks] == ["a", "b"] and kept.num_waiting == 3
    field, message = failures.failed["poison"]
    assert field is None and "secret" not in message and set(failures.failed) == {"poison"}


def test_an_unattributed_failure_raises_the_steps_own_error():
    step = SchedulerOutput(chunks=[_chunk("a"), _chunk("b")])
    error = RuntimeError("the step")

    def model_pass(subset: SchedulerOutput) -> None:
        raise RuntimeError("everyone")

    with pytest.raises(RuntimeError) as raised:
        without_failing_requests(step, RequestFailures(), model_pass, error)
    assert raised.value is error


def test_requests_that_already_failed_are_not_probed():
    step = SchedulerOutput(chunks=[_chunk("a"), _chunk("gone"), _chunk("poison")])
    failures = RequestFailures()
    failures.record("gone", ValueError("its state"))
    seen: list[str] = []

    def model_pass(subset: SchedulerOutput) -> None:
        seen.extend(c.req_id for c in subset.chunks)
        if any(c.req_id == "poison" for c in subset.chunks):
            raise RuntimeError()

    kept = without_failing_requests(step, failures, model_pass, RuntimeError())
    assert "gone" not in seen and [c.req_id for c in kept.chunks] == ["a"]


def test_an_output_of_fewer_chunks_is_aligned_with_the_scheduled_step():
    step = SchedulerOutput(chunks=[_chunk("a"), _chunk("poison"), _chunk("b")])
    output = aligned_output(step, ModelRunnerOutput(req_ids=["a", "b"], sampled_token_ids=[[3], [4]]))
    assert output.req_ids == ["a", "poison", "b"] and output.sampled_token_ids == [[3], [], [4]]
