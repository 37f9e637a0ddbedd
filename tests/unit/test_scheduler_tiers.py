"""The scheduler with KV tiers below the pool (a fake connector, no model): evicted cached blocks are handed
to the tiers, a prefix found there is loaded while the request waits in LOADING_KV and others keep running,
then it proceeds as a prefix hit; partial and cancelled loads; exact block ids."""

from __future__ import annotations

from collections.abc import Sequence

from tests.unit.test_scheduler import BS, add, shape, step
from tokenmill.core.kv_manager import KVCacheManager
from tokenmill.core.request import RequestStatus
from tokenmill.core.scheduler import Scheduler, SchedulerLimits


class FakeTiers:
    """Remembers evicted hashes; loads finish when the test says (`complete`), with as many blocks as it says."""

    def __init__(self) -> None:
        self.held: set[bytes] = set()
        self.evicted: list[tuple[int, bytes]] = []
        self.loads: dict[str, tuple[list[bytes], list[int]]] = {}
        self.ready: dict[str, int] = {}
        self.cancelled: list[str] = []

    def on_evict(self, block_id: int, block_hash: bytes) -> None:
        self.evicted.append((block_id, block_hash))
        self.held.add(block_hash)

    def num_tier_hits(self, block_hashes: Sequence[bytes]) -> int:
        count = 0
        while count < len(block_hashes) and block_hashes[count] in self.held:
            count += 1
        return count

    def start_load(self, request_id: str, block_hashes: list[bytes], block_ids: list[int]) -> None:
        self.loads[request_id] = (block_hashes, block_ids)

    def complete(self, request_id: str, num_blocks: int | None = None) -> None:
        hashes, _ = self.loads.pop(request_id)
        self.ready[request_id] = len(hashes) if num_blocks is None else num_blocks

    def finished_loads(self) -> dict[str, int]:
        ready, self.ready = self.ready, {}
        return ready

    def cancel_load(self, request_id: str) -> None:
        self.cancelled.append(request_id)
        self.loads.pop(request_id, None)


def make(num_blocks: int = 8, budget: int = 64) -> tuple[Scheduler, FakeTiers]:
    tiers = FakeTiers()
    limits = SchedulerLimits(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=32)
    return Scheduler(limits, KVCacheManager(num_blocks, BS, tiers=tiers)), tiers


def run_to_end(sched: Scheduler) -> None:
    while sched.has_unfinished():
        step(sched)


def evict_a(sched: Scheduler) -> None:
    """'a' (13 tokens: 3 full blocks cached) runs, then 'b' (29 tokens) needs every block of the 8."""
    add(sched, "a", 13, max_tokens=1)
    run_to_end(sched)
    add(sched, "b", 29, max_tokens=1, first=100)
    run_to_end(sched)


def test_evicted_cached_blocks_go_to_the_tiers_and_come_back_as_a_load() -> None:
    sched, tiers = make()
    evict_a(sched)
    # b took every block: a's 3 cached ones went to the tiers (its partial 4th had no hash to store under).
    assert sorted(block_id for block_id, _ in tiers.evicted) == [0, 1, 2]
    a = add(sched, "a2", 13, max_tokens=2)
    out = sched.schedule()
    assert out.chunks == [] and a.status == RequestStatus.LOADING_KV and "a2" in sched.loading
    hashes, block_ids = tiers.loads["a2"]
    assert len(hashes) == 3 and len(block_ids) == 3
    assert sched.kv.block_ids("a2") == block_ids  # the load's blocks are held by the request
    assert sched.schedule().chunks == []  # the load is not done: nothing runs, nothing blocks
    tiers.complete("a2")
    out = step(sched)
    assert shape(out) == [("a2", 12, 1, True)]  # a prefix hit of 12 tokens, then only the last token computes
    assert a.num_cached_tokens == 12
    assert sched.kv.block_ids("a2")[:3] == block_ids


def test_others_keep_running_while_a_load_is_in_flight() -> None:
    sched, tiers = make(num_blocks=16)
    a = add(sched, "a", 13, max_tokens=1)
    run_to_end(sched)
    add(sched, "b", 61, max_tokens=1, first=100)  # 16 blocks: every cached block of a is evicted
    run_to_end(sched)
    assert a.is_finished and len(tiers.evicted) == 3
    add(sched, "a2", 13, max_tokens=4)
    add(sched, "c", 5, max_tokens=4, first=300)
    out = step(sched)
    assert shape(out) == [("c", 0, 5, True)]  # a2 loads; c is admitted behind it and runs
    out = step(sched)
    assert shape(out) == [("c", 5, 1, True)]
    tiers.complete("a2")
    out = step(sched)
    assert shape(out) == [("c", 6, 1, True), ("a2", 12, 1, True)]


def test_a_partial_load_recomputes_the_rest() -> None:
    sched, tiers = make()
    evict_a(sched)
    a = add(sched, "a2", 13, max_tokens=1)
    sched.schedule()
    _, block_ids = tiers.loads["a2"]
    tiers.complete("a2", num_blocks=1)  # the second block's file was corrupt
    out = step(sched)
    assert shape(out) == [("a2", 4, 9, True)]
    assert out.chunks[0].block_table[0] == block_ids[0]
    assert a.num_cached_tokens == 4


def test_a_failed_load_recomputes_everything_and_frees_its_blocks() -> None:
    sched, tiers = make()
    evict_a(sched)
    add(sched, "a2", 13, max_tokens=1)
    sched.schedule()
    free_before = sched.kv.num_free_blocks
    tiers.complete("a2", num_blocks=0)
    out = sched.schedule()
    assert shape(out) == [("a2", 0, 13, True)]
    assert sched.kv.num_free_blocks == free_before + 3 - 4  # the 3 load blocks back, then 4 for the prompt


def test_aborting_a_loading_request_cancels_its_load_and_frees_its_blocks() -> None:
    sched, tiers = make()
    evict_a(sched)
    add(sched, "a2", 13, max_tokens=1)
    sched.schedule()
    assert sched.kv.num_free_blocks == 5
    sched.finish_requests(["a2"], RequestStatus.FINISHED_ABORTED)
    assert tiers.cancelled == ["a2"] and not sched.loading and not sched.has_unfinished()
    assert sched.kv.num_free_blocks == 8


def test_prompt_logprobs_requests_skip_the_tiers() -> None:
    sched, tiers = make()
    evict_a(sched)
    add(sched, "a2", 13, max_tokens=1, prompt_logprobs=0)
    out = sched.schedule()
    assert shape(out) == [("a2", 0, 13, True)] and tiers.loads == {}
