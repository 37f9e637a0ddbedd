"""Cache salts hold in every tier: a prompt evicted to the host or disk tier under one salt is never a hit for
another salt, and is one for its own (the tiers key blocks by the same salted hashes as the device pool)."""

from __future__ import annotations

import pytest

from tests.e2e.test_kv_tiers import GREEDY, SMALL_POOL, baseline, model, prompts  # noqa: F401  (fixtures)
from tokenmill import LLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tier_hits(llm: LLM) -> int:
    stats = llm.engine.stats()
    return stats["kv_tier_host_hit_blocks"] + stats["kv_tier_disk_hit_blocks"]


@pytest.mark.parametrize("tiers", ["host", "disk"])
def test_tier_hits_never_cross_salts(tiers, model, prompts, baseline, tmp_path):  # noqa: F811
    kwargs = {"kv_host_bytes": "64MiB"} if tiers == "host" else {"kv_disk_path": str(tmp_path),
                                                                   "kv_disk_bytes": "64MiB"}
    llm = LLM(model=model, **SMALL_POOL, **kwargs)

    def run(prompt: list[int], salt: str) -> list[int]:
        output = llm.generate([{"prompt_token_ids": prompt}], GREEDY, cache_salt=salt)[0].outputs[0].token_ids
        llm.engine.flush_kv_tiers()
        return output

    assert run(prompts[0], "tenant-a") == baseline[0]
    for other in prompts[1:]:  # evict the first prompt's blocks from the device pool into the tier
        run(other, "tenant-a")
    assert tier_hits(llm) == 0
    assert run(prompts[0], "tenant-b") == baseline[0]
    assert tier_hits(llm) == 0, "another salt found the evicted blocks in a tier"
    for other in prompts[1:]:
        run(other, "tenant-a")
    before = tier_hits(llm)
    assert run(prompts[0], "tenant-a") == baseline[0]
    assert tier_hits(llm) - before >= 12, "the same salt did not find its own evicted blocks"
