"""LoRA in the pure-Python core: slots placed least-recently-used first, admission bounded by max_loras, and
prefix-cache roots that separate adapters."""

from __future__ import annotations

from tokenmill.core.kv_manager import KVCacheManager
from tokenmill.core.lora_slots import LoRASlots
from tokenmill.core.prefix_cache import extend_block_hashes, salt_root
from tokenmill.core.request import Request
from tokenmill.core.sched_io import ModelRunnerOutput, ScheduledChunk
from tokenmill.core.scheduler import Scheduler, SchedulerLimits
from tokenmill.sampling_params import SamplingParams


def _place(slots: LoRASlots, adapters: list[str | None]) -> tuple[list[int], dict[int, str]]:
    chunks = [ScheduledChunk(f"r{i}", [1], 0, [0], sample=True) for i in range(len(adapters))]
    requests = {f"r{i}": Request(f"r{i}", [1], SamplingParams(), lora_id=a) for i, a in enumerate(adapters)}
    loads = slots.place(chunks, requests)
    return [c.lora_slot for c in chunks], loads


def test_slots_are_reused_then_evicted_least_recently_used() -> None:
    slots = LoRASlots(2)
    assert _place(slots, ["a", None, "b", "a"]) == ([0, -1, 1, 0], {0: "a", 1: "b"})
    assert _place(slots, ["b"]) == ([1], {})  # resident: nothing to load; b is now the most recent
    assert _place(slots, ["c"]) == ([0], {0: "c"})  # a was least recently used
    assert _place(slots, ["c", "a"]) == ([0, 1], {1: "a"})  # b goes, never c, which this step uses
    assert slots.num_loads == 4


def test_admission_keeps_running_adapters_within_max_loras() -> None:
    limits = SchedulerLimits(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64, max_loras=2)
    scheduler = Scheduler(limits, KVCacheManager(32, 4, enable_prefix_caching=True))
    for index, adapter in enumerate(["a", "b", "c", None, "a"]):
        scheduler.add_request(Request(f"r{index}", [1, 2, 3], SamplingParams(max_tokens=2), lora_id=adapter))
    out = scheduler.schedule()
    assert [c.req_id for c in out.chunks] == ["r0", "r1", "r3", "r4"]  # c waits: a and b hold both slots
    assert [c.lora_slot for c in out.chunks] == [0, 1, -1, 0]
    assert out.lora_loads == {0: "a", 1: "b"}
    for _ in range(2):  # a and b finish after two tokens; c then takes a's least recently used slot
        scheduler.update(out, ModelRunnerOutput([c.req_id for c in out.chunks], [[5] for _ in out.chunks]))
        out = scheduler.schedule()
    assert [(c.req_id, c.lora_slot) for c in out.chunks] == [("r2", 0)] and out.lora_loads == {0: "c"}


def test_prefix_roots_separate_adapters_and_keep_salted_roots() -> None:
    roots = [salt_root(None), salt_root(None, "a"), salt_root(None, "b"), salt_root("s"), salt_root("s", "a"),
             salt_root("a"), salt_root("", "a")]
    assert roots[0] is None and len(set(roots[1:])) == 6
    assert salt_root("s") == salt_root("s", None)  # salted caches (and disk tiers) keep their hashes
    chains = []
    for root in roots[:3]:
        hashes: list[bytes] = []
        extend_block_hashes(hashes, list(range(8)), 4, root)
        chains.append(hashes)
    assert len({h for chain in chains for h in chain}) == 6  # no block hash shared between adapters
