"""The contract between the KV manager / scheduler and the KV tiers below the device pool (host RAM, disk).

Pure Python: the scheduler only learns which hashes a tier holds, starts loads and polls them; the tier
connector (tokenmill/kv_tiers/) does every copy. Loads finish asynchronously: a request whose prefix is
being loaded waits in LOADING_KV while others run, and the step never blocks on a tier read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class KVTierConnector(Protocol):
    def on_evict(self, block_id: int, block_hash: bytes) -> None:
        """A cached device block is about to be reused: snapshot its KV now (later the step overwrites it)."""

    def num_tier_hits(self, block_hashes: Sequence[bytes]) -> int:
        """How many leading hashes some tier below the device holds."""

    def start_load(self, request_id: str, block_hashes: list[bytes], block_ids: list[int]) -> None:
        """Load these blocks' KV into these (freshly allocated) device blocks, in the background."""

    def finished_loads(self) -> dict[str, int]:
        """Loads done since the last call: request id -> leading blocks now written into the device pool.

        Fewer than asked means the rest was missing or unreadable: the request recomputes them."""

    def cancel_load(self, request_id: str) -> None:
        """The request ended: never write its blocks (they may go to another request at once)."""
