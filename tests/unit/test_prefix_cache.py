"""Prefix cache through the KV manager: exact block ids, hit lengths and eviction order."""

from tokenmill.core.kv_manager import KVCacheManager
from tokenmill.core.prefix_cache import hash_block
from tokenmill.core.request import Request
from tokenmill.sampling_params import SamplingParams

BS = 4


def make_request(rid: str, tokens: list[int], **params) -> Request:
    return Request(rid, tokens, SamplingParams(**params))


def run_prefill(kv: KVCacheManager, req: Request) -> int:
    """Admit like the scheduler does, compute the whole prompt, cache full blocks. Returns the hit."""
    blocks, hit = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - hit, blocks)
    req.num_computed_tokens = req.num_tokens
    kv.cache_full_blocks(req)
    return hit


def test_hashes_chain_over_the_whole_prefix():
    h1 = hash_block(None, [1, 2, 3, 4])
    assert hash_block(None, [1, 2, 3, 4]) == h1
    assert hash_block(h1, [5, 6, 7, 8]) != hash_block(None, [5, 6, 7, 8])
    assert hash_block(None, [1, 2, 3, 5]) != h1


def test_only_full_computed_blocks_are_cached():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    req = make_request("a", list(range(10)))  # 2 full blocks + 2 tokens
    assert run_prefill(kv, req) == 0
    assert kv.block_ids("a") == [0, 1, 2]
    assert len(kv.cache) == 2


def test_partial_computation_caches_only_processed_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    req = make_request("a", list(range(12)))
    assert kv.allocate_slots(req, 6)
    req.num_computed_tokens = 6
    kv.cache_full_blocks(req)
    assert len(kv.cache) == 1
    assert kv.allocate_slots(req, 6)
    req.num_computed_tokens = 12
    kv.cache_full_blocks(req)
    assert len(kv.cache) == 3


def test_second_request_hits_shared_prefix_blocks():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_request("a", list(range(10)))
    run_prefill(kv, a)
    b = make_request("b", list(range(8)) + [99, 98, 97])
    assert run_prefill(kv, b) == 8
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2] == [0, 1]
    assert kv.block_ids("b")[2:] == [3]
    assert kv.pool.blocks[0].ref_count == 2


def test_a_fully_cached_prompt_still_recomputes_its_last_token():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    run_prefill(kv, make_request("a", list(range(8))))
    b = make_request("b", list(range(8)))
    blocks, hit = kv.get_computed_blocks(b)
    assert hit == 4  # 7 tokens may hit, rounded down to whole blocks
    assert [blk.block_id for blk in blocks] == [0]


def test_freed_blocks_stay_cached_and_tail_is_evicted_first():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a = make_request("a", list(range(12)) + [100])  # blocks 0,1,2 full, 3 partial
    run_prefill(kv, a)
    kv.forget(a)
    # Free queue: the never-used blocks first, then a's blocks tail first.
    assert kv.pool.free_block_ids() == [4, 5, 3, 2, 1, 0]
    # A new unrelated request takes 4, 5, then evicts a's tail block 3 (uncached) and 2 (cached).
    c = make_request("c", [7] * 16)
    assert kv.allocate_slots(c, 16)
    assert kv.block_ids("c") == [4, 5, 3, 2]
    assert kv.pool.blocks[2].block_hash is None
    # a's first two blocks survived eviction: a rerun hits them.
    a2 = make_request("a2", list(range(12)) + [100])
    blocks, hit = kv.get_computed_blocks(a2)
    assert hit == 8 and [b.block_id for b in blocks] == [0, 1]


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    req = make_request("a", list(range(20)))
    assert not kv.allocate_slots(req, 20)
    assert kv.block_ids("a") == []
    assert kv.num_free_blocks == 3


def test_reviving_cached_free_blocks_counts_against_free_space():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a = make_request("a", list(range(8)) + [50])
    run_prefill(kv, a)  # blocks 0, 1 cached; 2 partial
    kv.forget(a)
    b = make_request("b", list(range(8)) + [51] * 8)  # hits 2 blocks, needs 2 more: only 1 left
    blocks, hit = kv.get_computed_blocks(b)
    assert hit == 8
    assert not kv.allocate_slots(b, 8, blocks)
    assert kv.num_free_blocks == 3


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    run_prefill(kv, make_request("a", list(range(10))))
    assert kv.get_computed_blocks(make_request("b", list(range(10))))[1] == 0
    assert len(kv.cache) == 0


def test_prompt_logprobs_requests_skip_the_cache():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    run_prefill(kv, make_request("a", list(range(10))))
    b = make_request("b", list(range(10)), prompt_logprobs=1)
    assert kv.get_computed_blocks(b)[1] == 0


def test_duplicate_block_content_keeps_the_first_registration():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(5)))
    b = make_request("b", list(range(5)))
    # Both admitted before either computed: no hit for b, separate blocks.
    assert kv.allocate_slots(a, 5) and kv.allocate_slots(b, 5)
    for r in (a, b):
        r.num_computed_tokens = 5
        kv.cache_full_blocks(r)
    assert len(kv.cache) == 1
    assert kv.pool.blocks[kv.block_ids("a")[0]].block_hash is not None
    assert kv.pool.blocks[kv.block_ids("b")[0]].block_hash is None
    assert kv.cache.num_queried_tokens == 0
