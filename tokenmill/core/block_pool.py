"""KV blocks: reference counts and an O(1) LRU queue of free blocks.

A free block may still hold a cached prefix (its hash stays registered) until it is handed out again;
the free queue is therefore also the eviction order of the prefix cache: the front is evicted first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set while the block is registered in the prefix cache


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # block_id -> None, in eviction order (front = least recently freed).
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def free_block_ids(self) -> list[int]:
        """Free blocks in eviction order (for tests and metrics)."""
        return list(self._free)

    def pop_free(self) -> KVBlock:
        """Take the least recently freed block; the caller must first evict its cached hash, if any."""
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        block.ref_count = 1
        return block

    def touch(self, block: KVBlock) -> None:
        """Take one more reference; a free (cached) block leaves the free queue."""
        if block.ref_count == 0:
            del self._free[block.block_id]
        block.ref_count += 1

    def release(self, block: KVBlock) -> None:
        """Drop one reference; at zero the block joins the back of the free queue."""
        if block.ref_count <= 0:
            raise RuntimeError(f"block {block.block_id} released more often than taken")
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block.block_id] = None
