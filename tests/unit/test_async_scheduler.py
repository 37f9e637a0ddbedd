"""Asynchronous scheduling in core/: step n+1 planned before step n's tokens are known (no model).

Placeholders, one-step-late stops, blocks freed when the stopping step reports, preemption and request-id
reuse while a step is in flight, and undoing plans whose steps raised: exact counts and block ids."""

from tokenmill.core.kv_manager import KVCacheManager
from tokenmill.core.request import Request, RequestStatus
from tokenmill.core.sched_io import PLACEHOLDER_TOKEN_ID as PH
from tokenmill.core.sched_io import ModelRunnerOutput, SchedulerOutput
from tokenmill.core.scheduler import Scheduler, SchedulerLimits
from tokenmill.sampling_params import SamplingParams

BS = 4


def make(num_blocks: int = 16, budget: int = 32, max_model_len: int = 64) -> Scheduler:
    limits = SchedulerLimits(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=max_model_len)
    return Scheduler(limits, KVCacheManager(num_blocks, BS), async_scheduling=True)


def add(sched: Scheduler, rid: str, prompt_len: int, max_tokens: int = 8, first: int = 0, **kw) -> Request:
    req = Request(rid, [first + i for i in range(prompt_len)], SamplingParams(max_tokens=max_tokens, **kw))
    sched.add_request(req)
    return req


def ran(out: SchedulerOutput, tokens: dict[str, int]) -> ModelRunnerOutput:
    return ModelRunnerOutput([c.req_id for c in out.chunks],
                             [[tokens[c.req_id]] if c.sample else [] for c in out.chunks])


def chunks(out: SchedulerOutput) -> list[tuple[str, int, list[int], bool, bool]]:
    return [(c.req_id, c.start_pos, c.token_ids, c.sample, c.placeholder) for c in out.chunks]


def test_the_next_step_is_planned_with_a_placeholder_before_the_tokens_arrive():
    sched = make()
    a = add(sched, "a", 5, max_tokens=4)
    s1 = sched.schedule()
    assert chunks(s1) == [("a", 0, [0, 1, 2, 3, 4], True, False)]
    assert (a.num_computed_tokens, a.num_output_placeholders) == (5, 1)
    s2 = sched.schedule()  # planned before s1's token is known
    assert chunks(s2) == [("a", 5, [PH], True, True)]
    assert s2.chunks[0].block_table == [0, 1]
    assert (a.num_computed_tokens, a.num_output_placeholders) == (6, 2)
    [u1] = sched.update(s1, ran(s1, {"a": 10}))
    assert u1.new_token_ids == [10] and a.all_token_ids == [0, 1, 2, 3, 4, 10]
    assert a.num_output_placeholders == 1
    # Only the block s1 wrote is cached: s2 (position 5) is still in flight.
    assert sched.kv._num_cached == {"a": 1}
    s3 = sched.schedule()
    assert chunks(s3) == [("a", 6, [PH], True, True)]
    sched.update(s2, ran(s2, {"a": 11}))
    s4 = sched.schedule()
    assert chunks(s4) == [("a", 7, [PH], True, True)] and s4.chunks[0].block_table == [0, 1]
    sched.update(s3, ran(s3, {"a": 12}))
    # Output 3 known + 1 in flight = max_tokens: not planned again.
    assert sched.schedule().is_empty
    sched.update(s4, ran(s4, {"a": 13}))
    assert a.status == RequestStatus.FINISHED_LENGTH and a.output_token_ids == [10, 11, 12, 13]
    assert sched.kv.num_free_blocks == 16 and not sched.has_unfinished()


def test_a_stop_is_seen_one_step_late_and_the_extra_token_is_discarded():
    sched = make()
    a = add(sched, "a", 3, stop_token_ids=[99])
    b = add(sched, "b", 3, first=50)
    s1 = sched.schedule()
    s2 = sched.schedule()
    assert [c.placeholder for c in s2.chunks] == [True, True]
    [ua, ub] = sched.update(s1, ran(s1, {"a": 99, "b": 60}))
    assert ua.new_token_ids == [99] and a.status == RequestStatus.FINISHED_STOPPED and a.stop_reason == 99
    # a's blocks go back as soon as its stopping step reports, while s2 (which computed one more) runs.
    assert sched.kv.block_ids("a") == [] and sched.kv.num_free_blocks == 15
    s3 = sched.schedule()
    assert chunks(s3) == [("b", 4, [PH], True, True)] and s3.finished_req_ids == ["a"]
    updates = sched.update(s2, ran(s2, {"a": 5, "b": 61}))
    assert [(u.request.request_id, u.new_token_ids) for u in updates] == [("b", [61])]
    assert a.output_token_ids == [99]  # the token a computed after its stop never appears
    assert b.output_token_ids == [60, 61]


def test_each_planned_step_computes_the_token_its_predecessor_samples():
    """Deeper plans work too (the engine keeps one step ahead): the worker fills each placeholder with the
    token it sampled for the request in the step before, which it has run by then."""
    sched = make()
    a = add(sched, "a", 3)
    plans = [sched.schedule() for _ in range(4)]
    assert [chunks(p) for p in plans[1:]] == [[("a", pos, [PH], True, True)] for pos in (3, 4, 5)]
    assert (a.num_computed_tokens, a.num_output_placeholders) == (6, 4)
    for i, plan in enumerate(plans):
        sched.update(plan, ran(plan, {"a": 10 + i}))
    assert a.output_token_ids == [10, 11, 12, 13] and a.num_output_placeholders == 0
    assert chunks(sched.schedule()) == [("a", 6, [13], True, False)]


def test_max_model_len_is_never_planned_past():
    sched = make(max_model_len=6)
    a = add(sched, "a", 4, max_tokens=None)
    s1 = sched.schedule()
    s2 = sched.schedule()
    assert chunks(s2) == [("a", 4, [PH], True, True)]
    # 4 prompt + 2 in flight = 6 = max_model_len: no third plan, no slot past the context.
    sched.update(s1, ran(s1, {"a": 7}))
    assert sched.schedule().is_empty
    sched.update(s2, ran(s2, {"a": 8}))
    assert a.status == RequestStatus.FINISHED_LENGTH and a.num_tokens == 6


def test_a_request_preempted_while_its_step_runs_keeps_that_token_and_resumes_after_it():
    sched = make(num_blocks=3)
    a = add(sched, "a", 4)
    b = add(sched, "b", 4, first=20)
    s1 = sched.schedule()
    assert [c.block_table for c in s1.chunks] == [[0], [1]]
    s2 = sched.schedule()  # a needs a second block and takes the last; b's needs one more: b is preempted
    assert chunks(s2) == [("a", 4, [PH], True, True)] and s2.chunks[0].block_table == [0, 2]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.num_output_placeholders == 1
    sched.update(s1, ran(s1, {"a": 10, "b": 30}))
    assert b.output_token_ids == [30] and b.num_output_placeholders == 0 and b.num_computed_tokens == 0
    assert b.all_token_ids == [20, 21, 22, 23, 30]
    s3 = sched.schedule()  # b (5 tokens, 2 blocks) does not fit beside a yet
    assert chunks(s3) == [("a", 5, [PH], True, True)]
    sched.update(s2, ran(s2, {"a": 11}))
    assert a.output_token_ids == [10, 11]


def test_a_preempted_request_that_stops_with_its_in_flight_token_finishes_from_the_queue():
    sched = make(num_blocks=3)
    add(sched, "a", 4)
    b = add(sched, "b", 4, first=20, stop_token_ids=[30])
    s1 = sched.schedule()
    sched.schedule()
    assert b.status == RequestStatus.PREEMPTED
    sched.update(s1, ran(s1, {"a": 10, "b": 30}))
    assert b.status == RequestStatus.FINISHED_STOPPED and b not in sched.waiting
    assert sched.num_waiting == 0


def test_a_reused_request_id_does_not_take_the_discarded_results_of_its_predecessor():
    sched = make()
    old = add(sched, "a", 3, max_tokens=1)
    s1 = sched.schedule()
    assert sched.schedule().is_empty  # max_tokens 1 is in flight: nothing more to plan
    sched.update(s1, ran(s1, {"a": 5}))
    assert old.status == RequestStatus.FINISHED_LENGTH
    new = add(sched, "a", 3, first=40, stop_token_ids=[99])
    s2 = sched.schedule()
    assert s2.finished_req_ids == ["a"] and [n.req_id for n in s2.new_requests] == ["a"]
    s3 = sched.schedule()
    sched.update(s2, ran(s2, {"a": 6}))
    sched.update(s3, ran(s3, {"a": 7}))
    assert old.output_token_ids == [5] and new.output_token_ids == [6, 7]


def test_an_aborted_request_in_a_planned_step_is_skipped_when_that_step_reports():
    sched = make()
    a = add(sched, "a", 3)
    s1 = sched.schedule()
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert sched.update(s1, ran(s1, {"a": 5})) == [] and a.output_token_ids == []
    assert sched.kv.num_free_blocks == 16


def test_discarded_plans_are_undone():
    sched = make()
    a = add(sched, "a", 5)
    s1 = sched.schedule()
    sched.update(s1, ran(s1, {"a": 10}))
    s2 = sched.schedule()
    s3 = sched.schedule()
    assert (a.num_computed_tokens, a.num_output_placeholders) == (7, 2)
    sched.discard_plans([s2, s3])
    assert (a.num_computed_tokens, a.num_output_placeholders) == (5, 0)
    # Planning resumes as if those steps had never been scheduled: the known token 10 is computed next.
    assert chunks(sched.schedule()) == [("a", 5, [10], True, False)]


def test_a_sibling_waits_until_the_first_prompt_is_cached():
    sched = make()
    first = Request("g#0", list(range(9)), SamplingParams(max_tokens=4))
    second = Request("g#1", list(range(9)), SamplingParams(max_tokens=4), wait_for="g#0")
    sched.add_request(first)
    sched.add_request(second)
    s1 = sched.schedule()
    assert [c.req_id for c in s1.chunks] == ["g#0"]
    s2 = sched.schedule()  # g#0's prompt is counted computed, but its blocks are not cached yet
    assert [c.req_id for c in s2.chunks] == ["g#0"]
    sched.update(s1, ran(s1, {"g#0": 1}))
    s3 = sched.schedule()
    assert chunks(s3)[1] == ("g#1", 8, [8], True, False)  # two cached blocks hit
    assert second.num_cached_tokens == 8


def test_synchronous_steps_on_an_async_scheduler_match_the_plain_scheduler():
    """Schedule, then update before the next schedule: the same chunks as without async scheduling."""
    plain = Scheduler(SchedulerLimits(8, 6, 64), KVCacheManager(16, BS))
    planned = make(budget=6)
    for sched in (plain, planned):
        add(sched, "a", 9)
        add(sched, "b", 2, first=30)
    for i in range(6):
        outs = [sched.schedule() for sched in (plain, planned)]
        assert chunks(outs[0]) == chunks(outs[1])
        assert [c.block_table for c in outs[0].chunks] == [c.block_table for c in outs[1].chunks]
        for sched, out in zip((plain, planned), outs):
            sched.update(out, ran(out, {"a": 100 + i, "b": 200 + i}))
