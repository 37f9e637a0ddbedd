"""KV cache manager: which blocks each request holds, prefix hits, and what enters the prefix cache.

Allocation is all-or-nothing: when the pool cannot cover a request's next tokens nothing changes, and
the scheduler decides whom to preempt. Only full blocks whose tokens the model has processed are cached.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenmill.core.block_pool import BlockPool, KVBlock
from tokenmill.core.prefix_cache import PrefixCache, extend_block_hashes, salt_root
from tokenmill.core.request import Request
from tokenmill.core.tier_io import KVTierConnector


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 tiers: KVTierConnector | None = None) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.cache = PrefixCache()
        self._blocks: dict[str, list[KVBlock]] = {}
        self._hashes: dict[str, list[bytes]] = {}
        self._num_cached: dict[str, int] = {}  # leading blocks of the request already in the cache
        # Host / disk tiers below the pool (None: off): evicted cached blocks go there, lookups continue there.
        self.tiers = tiers if enable_prefix_caching else None

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [block.block_id for block in self._blocks.get(request_id, [])]

    def _block_hashes(self, request: Request) -> list[bytes]:
        hashes = self._hashes.setdefault(request.request_id, [])
        if len(hashes) < request.num_tokens // self.block_size:
            # The salt's root only matters for the first block; derive it when a new block is full.
            root = salt_root(request.cache_salt, request.lora_id) if not hashes else None
            extend_block_hashes(hashes, request.all_token_ids, self.block_size, root)
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Cached blocks of the request's longest known prefix, and how many tokens they cover.

        At most num_tokens - 1 tokens can hit: the last one must run through the model to give logits.
        Requests that want prompt logprobs skip the cache, since cached tokens produce no logits.
        """
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits = self.cache.lookup(self._block_hashes(request)[:max_hit_blocks])
        num_hit_tokens = len(hits) * self.block_size
        self.cache.record_query(request.num_tokens, num_hit_tokens)
        return hits, num_hit_tokens

    def get_tier_hits(self, request: Request, num_device_hits: int) -> list[bytes]:
        """Hashes of the blocks right after the device hits that a lower tier holds (same limits as above)."""
        if self.tiers is None or request.sampling_params.prompt_logprobs is not None:
            return []
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        candidates = self._block_hashes(request)[num_device_hits:max_hit_blocks]
        return candidates[: self.tiers.num_tier_hits(candidates)] if candidates else []

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: Sequence[KVBlock] = (),
        num_lookahead_tokens: int = 0,
    ) -> bool:
        """Make room for num_new_tokens (+ lookahead) after the computed ones; False if the pool is short.

        `computed_blocks` are prefix hits of a request being admitted; they are taken before new blocks.
        """
        blocks = self._blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        total_tokens = num_computed + num_new_tokens + num_lookahead_tokens
        num_required = -(-total_tokens // self.block_size) - len(blocks) - len(computed_blocks)
        # Hits that sit in the free queue stop being free once taken.
        num_revived = sum(1 for block in computed_blocks if block.ref_count == 0)
        if max(num_required, 0) + num_revived > self.pool.num_free_blocks:
            return False
        for block in computed_blocks:
            self.pool.touch(block)
            blocks.append(block)
        if computed_blocks:
            self._num_cached[request.request_id] = len(blocks)
        for _ in range(num_required):
            block = self.pool.pop_free()
            if self.tiers is not None and block.block_hash is not None:
                self.tiers.on_evict(block.block_id, block.block_hash)
            self.cache.evict(block)
            blocks.append(block)
        return True

    def cache_full_blocks(self, request: Request, num_written: int | None = None) -> None:
        """Register the request's newly full, computed blocks in the prefix cache; `num_written` caps the
        tokens counted as computed (asynchronous scheduling counts tokens of steps still in flight)."""
        if not self.enable_prefix_caching:
            return
        num_computed = request.num_computed_tokens if num_written is None else min(num_written,
                                                                                   request.num_computed_tokens)
        num_full = num_computed // self.block_size
        start = self._num_cached.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request)
        blocks = self._blocks[request.request_id]
        for i in range(start, num_full):
            self.cache.insert(blocks[i], hashes[i])
        self._num_cached[request.request_id] = num_full

    def num_cached_blocks(self, request: Request) -> int:
        """Leading blocks of the request registered in the prefix cache (by it or before it)."""
        return self._num_cached.get(request.request_id, 0)

    def keep_loaded_prefix(self, request: Request, num_blocks: int) -> None:
        """After a tier load: keep the request's first num_blocks blocks (device hits, then loaded ones), register
        them in the prefix cache and give back the blocks whose load failed."""
        blocks = self._blocks.get(request.request_id, [])
        for block in reversed(blocks[num_blocks:]):
            self.pool.release(block)
        del blocks[num_blocks:]
        request.num_computed_tokens = num_blocks * self.block_size
        self.cache_full_blocks(request)

    def free(self, request: Request) -> None:
        """Give back the request's blocks, tail first, so the tail is evicted before the shared head."""
        for block in reversed(self._blocks.pop(request.request_id, [])):
            self.pool.release(block)
        self._num_cached.pop(request.request_id, None)

    def forget(self, request: Request) -> None:
        """Free the blocks and drop the request's hashes (it will not come back)."""
        self.free(request)
        self._hashes.pop(request.request_id, None)
