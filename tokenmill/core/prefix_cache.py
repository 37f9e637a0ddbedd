"""Automatic prefix caching: chained hashes of full blocks and a hash -> block map.

A block's hash covers its tokens and, through the parent hash, every token before it, so equal hashes
mean equal prefixes. blake2b keeps the hash stable across processes (a later disk tier relies on that).

A cache salt (one tenant, or one narrower scope) and a LoRA adapter change the root the chain starts from:
only the first block's parent is derived from them, so every later block is salted through the chain and
equal prompts under different salts (or adapters) never share a hash, in this cache or in any tier keyed by
the same hashes.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

from tokenmill.core.block_pool import KVBlock


# blake2b's personalization keeps a salt's root apart from any block hash (those are unpersonalized).
_SALT_PERSON = b"tokenmill-salt"


def salt_root(cache_salt: str | None, lora_id: str | None = None) -> bytes | None:
    """The parent hash of a request's first block: None (the unsalted root) without a salt or LoRA adapter.
    The adapter's identity joins the salt: KV computed through one adapter never serves another (or the base)."""
    if lora_id is not None:
        scope = f"{len(cache_salt) if cache_salt is not None else -1}:{cache_salt or ''}|lora:{lora_id}"
        return hashlib.blake2b(scope.encode("utf-8"), digest_size=16, person=_SALT_PERSON).digest()
    if cache_salt is None:
        return None
    return hashlib.blake2b(cache_salt.encode("utf-8"), digest_size=16, person=_SALT_PERSON).digest()


def hash_block(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(parent_hash or b"root")
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def extend_block_hashes(hashes: list[bytes], token_ids: Sequence[int], block_size: int,
                        root: bytes | None = None) -> None:
    """Append the hashes of newly full blocks of token_ids to `hashes` (which covers a prefix of them);
    `root` (salt_root of the request's salt) is the first block's parent."""
    num_full = len(token_ids) // block_size
    for i in range(len(hashes), num_full):
        parent = hashes[-1] if hashes else root
        hashes.append(hash_block(parent, token_ids[i * block_size : (i + 1) * block_size]))


class PrefixCache:
    def __init__(self) -> None:
        self._blocks: dict[bytes, KVBlock] = {}
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup(self, block_hashes: Sequence[bytes]) -> list[KVBlock]:
        """Blocks of the longest cached prefix of these hashes."""
        hits: list[KVBlock] = []
        for block_hash in block_hashes:
            block = self._blocks.get(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def insert(self, block: KVBlock, block_hash: bytes) -> bool:
        """Register a block under its hash; False when another block already holds that prefix."""
        if block.block_hash is not None or block_hash in self._blocks:
            return False
        block.block_hash = block_hash
        self._blocks[block_hash] = block
        return True

    def evict(self, block: KVBlock) -> None:
        """Forget a block's cached content before it is reused for other tokens."""
        if block.block_hash is None:
            return
        if self._blocks.get(block.block_hash) is block:
            del self._blocks[block.block_hash]
        block.block_hash = None

    def cached_blocks(self) -> list[tuple[bytes, KVBlock]]:
        """(hash, block) of every registered block (to persist the cache before a restart)."""
        return list(self._blocks.items())

    def record_query(self, num_queried: int, num_hit: int) -> None:
        self.num_queried_tokens += num_queried
        self.num_hit_tokens += num_hit
