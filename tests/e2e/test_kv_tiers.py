"""KV tiers in the engine: greedy output is the same with tiers on and off across eviction, reload,
preemption and speculative decoding; loaded blocks are bit-identical; bad disk files are recomputed."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from tests.e2e.conftest import make_prompts
from tokenmill import LLM, SamplingParams
from tokenmill.core.prefix_cache import extend_block_hashes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
# 24 blocks x 16 = 384 token slots: every returning 200-token prompt was evicted by the ones in between.
SMALL_POOL = dict(dtype="float32", max_model_len=384, num_kv_blocks=24)
BLOCK_BYTES = 2 * 2 * 16 * 2 * 24 * 4  # the tiny llama: 2 layers x K,V x 16 tokens x 2 KV heads x 24 dims x fp32


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


@pytest.fixture(scope="module")
def model(checkpoint_dir) -> str:
    return str(checkpoint_dir("llama"))


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return make_prompts(seed=3, lengths=[200, 200, 200])


@pytest.fixture(scope="module")
def baseline(model, prompts) -> list[list[int]]:
    return run(LLM(model=model, dtype="float32", max_model_len=384, enable_prefix_caching=False), prompts)


def returning(llm: LLM, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """Each prompt alone, then each again after the others evicted it from the pool."""
    first = [run(llm, [p])[0] for p in prompts]
    llm.engine.flush_kv_tiers()
    again = []
    for p in prompts:
        again.append(run(llm, [p])[0])
        llm.engine.flush_kv_tiers()
    return first, again


@pytest.mark.parametrize("tiers", ["host", "disk", "host+disk", "host, async scheduling"])
def test_returning_prompts_load_from_the_tier_with_the_same_output(tiers, model, prompts, baseline, tmp_path):
    kwargs: dict = {"async_scheduling": True} if tiers.endswith("async scheduling") else {}
    tiers = tiers.split(",")[0]
    if "host" in tiers:
        kwargs["kv_host_bytes"] = "64MiB" if tiers == "host" else 4 * BLOCK_BYTES  # host+disk: 4 blocks on the host
    if "disk" in tiers:
        kwargs.update(kv_disk_path=str(tmp_path), kv_disk_bytes="64MiB")
    llm = LLM(model=model, **SMALL_POOL, **kwargs)
    first, again = returning(llm, prompts)
    assert first == baseline and again == baseline
    stats = llm.engine.stats()
    hits = stats["kv_tier_host_hit_blocks"] + stats["kv_tier_disk_hit_blocks"]
    assert hits >= 2 * 12  # the last two returning prompts found their 12 full blocks below the device
    if tiers == "disk":
        assert stats["kv_tier_disk_hit_blocks"] >= 24 and stats["kv_tier_host_hit_blocks"] == 0
    if tiers == "host":
        assert stats["kv_tier_host_hit_blocks"] >= 24 and stats["kv_tier_disk_blocks"] == 0
    assert stats["kv_tier_loads"] >= 2 and stats["kv_tier_bytes_host_to_device"] == hits * BLOCK_BYTES
    events = llm.engine.take_kv_events()
    assert {e.kind for e in events} >= {"stored"} and llm.engine.take_kv_events() == []
    assert stats["kv_blocks_used"] == 0
    if tiers == "host+disk":
        assert stats["kv_tier_host_bytes"] <= 4 * BLOCK_BYTES and stats["kv_tier_disk_hit_blocks"] > 0


@pytest.mark.parametrize("spec", [None, "ngram"])
def test_preemption_and_speculation_give_the_same_output(spec, model):
    # Two 170-token prompts fit the pool (2 x 11 blocks of 24), growing by 60 tokens each they do not: preemption;
    # the preempted one's blocks are evicted to the host tier and loaded back when it resumes.
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    repeated = [p[:40] * 4 + p[:10] for p in make_prompts(seed=5, lengths=[40, 40, 40])]
    reference = run(LLM(model=model, dtype="float32", max_model_len=384, enable_prefix_caching=False), repeated, params)
    llm = LLM(model=model, **SMALL_POOL, kv_host_bytes="64MiB", speculative_method=spec)
    assert run(llm, repeated, params) == reference
    assert llm.engine.stats()["num_preemptions"] > 0
    llm.engine.flush_kv_tiers()
    assert run(llm, repeated, params) == reference
    stats = llm.engine.stats()
    assert stats["kv_tier_host_hit_blocks"] > 0
    if spec:
        assert stats["spec_num_draft_tokens"] > 0


def test_a_loaded_block_is_bit_identical_to_the_stored_one(model, prompts):
    llm = LLM(model=model, **SMALL_POOL, kv_host_bytes="64MiB")
    engine = llm.engine
    run(llm, [prompts[0]])
    hashes: list[bytes] = []
    extend_block_hashes(hashes, prompts[0], 16)
    hashes = hashes[:12]  # the blocks a return of the prompt loads (the 13th holds output tokens)
    blocks = engine.kv_manager.cache._blocks
    stored = {h: engine.kv_tiers.io.snapshot(blocks[h].block_id).clone() for h in hashes}
    run(llm, prompts[1:])
    engine.flush_kv_tiers()
    assert all(h in engine.kv_tiers.host and h not in blocks for h in hashes)  # evicted to the host tier
    for block_hash in hashes:
        assert torch.equal(engine.kv_tiers.host.get(block_hash), stored[block_hash])
    run(llm, [prompts[0]])
    assert engine.stats()["kv_tier_host_hit_blocks"] == 12
    for block_hash in hashes:
        assert torch.equal(engine.kv_tiers.io.snapshot(blocks[block_hash].block_id), stored[block_hash])


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "foreign"])
def test_a_bad_disk_file_is_skipped_and_recomputed(damage, model, prompts, baseline, tmp_path, caplog):
    llm = LLM(model=model, **SMALL_POOL, kv_disk_path=str(tmp_path), kv_disk_bytes="64MiB")
    run(llm, prompts)
    llm.engine.flush_kv_tiers()
    del llm
    files = sorted(Path(tmp_path).rglob("*.kvb"))
    assert files
    for path in files:
        data = path.read_bytes()
        if damage == "corrupt":
            path.write_bytes(data[:-5] + bytes(b ^ 0xFF for b in data[-5:]))
        elif damage == "truncated":
            path.write_bytes(data[: len(data) // 2])
        else:
            path.write_bytes(data.replace(b'"block_size": 16', b'"block_size": 32'))
    restarted = LLM(model=model, **SMALL_POOL, kv_disk_path=str(tmp_path), kv_disk_bytes="64MiB")
    with caplog.at_level(logging.WARNING, logger="tokenmill.kv_tiers.disk_tier"):
        assert run(restarted, prompts) == baseline
    stats = restarted.engine.stats()
    assert "ignoring" in caplog.text and stats["kv_tier_disk_hit_blocks"] == 0
    assert stats["kv_tier_disk_files_rejected"] >= 1


def test_restart_finds_the_disk_tier(model, prompts, baseline, tmp_path):
    llm = LLM(model=model, **SMALL_POOL, kv_disk_path=str(tmp_path), kv_disk_bytes="64MiB")
    run(llm, prompts)
    llm.engine.flush_kv_tiers()
    restarted = LLM(model=model, **SMALL_POOL, kv_disk_path=str(tmp_path), kv_disk_bytes="64MiB")
    outputs = restarted.generate([{"prompt_token_ids": prompts[0]}], GREEDY)
    assert outputs[0].outputs[0].token_ids == baseline[0]
    assert outputs[0].num_cached_tokens == 192  # 12 full blocks of the 200-token prompt, all from disk
    assert restarted.engine.stats()["kv_tier_disk_hit_blocks"] == 12


def test_a_full_disk_stops_stores_not_requests(model, prompts, baseline, tmp_path, monkeypatch):
    import errno

    from tokenmill.kv_tiers.disk_tier import DiskTier

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DiskTier, "_write_atomically", staticmethod(full))
    llm = LLM(model=model, **SMALL_POOL, kv_disk_path=str(tmp_path), kv_disk_bytes="64MiB")
    first, again = returning(llm, prompts)
    assert first == baseline and again == baseline
    stats = llm.engine.stats()
    assert stats["kv_tier_disk_store_errors"] >= 1 and stats["kv_tier_disk_blocks"] == 0
    assert llm.engine.kv_tiers.disk.stores_stopped


def test_tier_metrics_reach_the_prometheus_text(model, prompts):
    from tokenmill.server.metrics import ServerMetrics

    llm = LLM(model=model, **SMALL_POOL, kv_host_bytes="64MiB")
    returning(llm, prompts)
    text = ServerMetrics(llm.engine.stats, "m").render().decode()
    stats = llm.engine.stats()

    def value(name: str, label: str = "") -> float:
        for line in text.splitlines():
            match = re.fullmatch(rf"{name}\{{(.*)\}} ([0-9.e+-]+)", line)
            if match and 'model_name="m"' in match.group(1) and label in match.group(1):
                return float(match.group(2))
        raise AssertionError(f"{name} {label} missing from the metrics")

    assert value("tokenmill_kv_tier_hit_blocks_total", 'tier="host"') == stats["kv_tier_host_hit_blocks"] > 0
    assert value("tokenmill_kv_tier_hit_tokens_total", 'tier="host"') == stats["kv_tier_host_hit_blocks"] * 16
    assert value("tokenmill_kv_tier_bytes_moved_total", 'direction="host_to_device"') == \
        stats["kv_tier_host_hit_blocks"] * BLOCK_BYTES
    assert value("tokenmill_kv_tier_occupancy_bytes", 'tier="host"') == stats["kv_tier_host_bytes"] > 0
    assert value("tokenmill_kv_tier_loads_total") == stats["kv_tier_loads"] >= 2
    assert value("tokenmill_kv_tier_load_seconds_total") > 0
    plain = LLM(model=model, **SMALL_POOL)
    assert "kv_tier" not in ServerMetrics(plain.engine.stats, "m").render().decode()


def test_a_planned_shutdown_persists_the_pool_for_the_next_start(model, prompts, baseline, tmp_path):
    llm = LLM(model=model, **SMALL_POOL, kv_disk_path=str(tmp_path), kv_disk_bytes="64MiB")
    run(llm, [prompts[0]])  # fits the pool: nothing is evicted, nothing reaches the disk by itself
    llm.engine.flush_kv_tiers()
    assert llm.engine.stats()["kv_tier_disk_blocks"] == 0
    assert llm.engine.persist_kv_cache() == 13  # 12 prompt blocks and one of prompt + output
    assert llm.engine.persist_kv_cache() == 0  # already there
    restarted = LLM(model=model, **SMALL_POOL, kv_disk_path=str(tmp_path), kv_disk_bytes="64MiB")
    outputs = restarted.generate([{"prompt_token_ids": prompts[0]}], GREEDY)
    assert outputs[0].outputs[0].token_ids == baseline[0] and outputs[0].num_cached_tokens == 192
