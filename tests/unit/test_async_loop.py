"""The engine's side of asynchronous scheduling with a fake worker: step n+1 is planned and submitted before
step n's results are applied, the fallback steps synchronously, and a step that raises undoes both plans."""

from __future__ import annotations

import threading

import pytest

from tokenmill.core.kv_manager import KVCacheManager
from tokenmill.core.request import Request
from tokenmill.core.sched_io import ModelRunnerOutput, SchedulerOutput
from tokenmill.core.scheduler import Scheduler, SchedulerLimits
from tokenmill.engine.async_loop import PlannedSteps, plan_ahead_blocker, run_blocker
from tokenmill.sampling_params import SamplingParams


class RecordingScheduler(Scheduler):
    def __init__(self, log: list[str]) -> None:
        super().__init__(SchedulerLimits(8, 64, 64), KVCacheManager(16, 4), async_scheduling=True)
        self.log = log

    def schedule(self) -> SchedulerOutput:
        out = super().schedule()
        self.log.append(f"schedule {[c.start_pos for c in out.chunks]}")
        return out


def fake_worker(log: list[str], hold_first_until: threading.Event | None = None, fail_first: bool = False):
    calls = []

    def execute(out: SchedulerOutput) -> ModelRunnerOutput:
        calls.append(out)
        log.append(f"execute {[c.start_pos for c in out.chunks]}")
        if len(calls) == 1 and hold_first_until is not None:
            # Step 1 finishes only once step 2 has been planned: an engine that waited for step 1 first
            # would wait here until the timeout.
            assert hold_first_until.wait(5), "step 2 was not planned while step 1 ran"
        if len(calls) == 1 and fail_first:
            raise RuntimeError("device fault")
        return ModelRunnerOutput([c.req_id for c in out.chunks], [[100 + len(calls)] if c.sample else []
                                                                  for c in out.chunks])
    return execute


def test_step_n_plus_1_is_prepared_before_step_n_is_resolved():
    log: list[str] = []
    scheduler = RecordingScheduler(log)
    scheduler.add_request(Request("a", [1, 2, 3], SamplingParams(max_tokens=3)))
    second_planned = threading.Event()
    original = scheduler.schedule

    def schedule() -> SchedulerOutput:
        out = original()
        if len([line for line in log if line.startswith("schedule")]) == 2:
            second_planned.set()
        return out

    scheduler.schedule = schedule  # type: ignore[method-assign]
    planned = PlannedSteps(scheduler, fake_worker(log, hold_first_until=second_planned))
    try:
        results = []
        while scheduler.has_unfinished() or planned.in_flight:
            result = planned.next_result(plan_ahead=True, prev_step_seconds=None)
            if result is None:
                break
            log.append(f"apply {[c.start_pos for c in result[0].chunks]}")
            results.extend(u.new_token_ids for u in scheduler.update(*result))
    finally:
        planned.close()
    # Step 2 (position 3, a placeholder) is scheduled before step 1's results are applied, and so on.
    assert log.index("schedule [3]") < log.index("apply [0]")
    assert log.index("schedule [4]") < log.index("apply [3]")
    assert log.index("execute [3]") > log.index("execute [0]")  # the step thread runs them in order
    assert results == [[101], [102], [103]]
    # max_tokens=3 is in flight after step 3 is planned: no model step more (empty steps only hand the worker
    # finished ids).
    assert [line for line in log if line.startswith("execute") and line != "execute []"] == \
        ["execute [0]", "execute [3]", "execute [4]"]


def test_without_plan_ahead_each_step_is_applied_before_the_next_is_scheduled():
    log: list[str] = []
    scheduler = RecordingScheduler(log)
    scheduler.add_request(Request("a", [1, 2, 3], SamplingParams(max_tokens=2)))
    planned = PlannedSteps(scheduler, fake_worker(log))
    try:
        while (result := planned.next_result(plan_ahead=False, prev_step_seconds=None)) is not None:
            log.append("apply")
            scheduler.update(*result)
    finally:
        planned.close()
    assert log == ["schedule [0]", "execute [0]", "apply", "schedule [3]", "execute [3]", "apply", "schedule []",
                   "execute []"]


def test_a_step_that_raises_undoes_its_plan_and_the_one_after_it():
    log: list[str] = []
    scheduler = RecordingScheduler(log)
    request = Request("a", [1, 2, 3], SamplingParams(max_tokens=4))
    scheduler.add_request(request)
    planned = PlannedSteps(scheduler, fake_worker(log, fail_first=True))
    try:
        with pytest.raises(RuntimeError, match="device fault"):
            planned.next_result(plan_ahead=True, prev_step_seconds=None)
        assert not planned.in_flight
        assert (request.num_computed_tokens, request.num_output_placeholders) == (0, 0)
        result = planned.next_result(plan_ahead=False, prev_step_seconds=None)  # the prompt is run again
        assert result is not None and result[0].chunks[0].token_ids == [1, 2, 3]
    finally:
        planned.close()


def test_the_fallback_rules():
    from tokenmill.structured.params import StructuredOutputParams

    plain = Request("p", [1], SamplingParams(repetition_penalty=1.2, logprobs=3, min_tokens=2, seed=1))
    constrained = Request("g", [1], SamplingParams(structured_outputs=StructuredOutputParams(regex="a+")))
    assert plan_ahead_blocker([plain]) is None
    assert plan_ahead_blocker([plain, constrained]) == "request 'g' is grammar-constrained"
    assert run_blocker(speculative=False) is None and "speculative" in run_blocker(speculative=True)


def test_the_flags_turn_it_on_and_off_and_leave_the_default_to_the_platform():
    import argparse

    from tokenmill.engine_args import EngineArgs

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    assert parser.parse_args([]).async_scheduling is None
    assert parser.parse_args(["--async-scheduling"]).async_scheduling is True
    assert parser.parse_args(["--no-async-scheduling"]).async_scheduling is False
