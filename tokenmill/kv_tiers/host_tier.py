"""The host-RAM tier: an LRU of block payloads by chained block hash, bounded in bytes.

Pure bookkeeping (payloads are opaque; the connector stores pinned CPU tensors): thread-safe, since the
copier thread stores while the scheduler looks up and the loader reads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

Evicted = list[tuple[bytes, Any]]


class HostTier:
    name = "host"

    def __init__(self, capacity_bytes: int, on_event: Callable[[str, str, bytes], None] | None = None) -> None:
        if capacity_bytes < 1:
            raise ValueError(f"kv_host_bytes must be >= 1, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[bytes, tuple[Any, int]] = OrderedDict()  # front = least recently used
        self._bytes = 0
        self._lock = threading.Lock()
        self._on_event = on_event or (lambda kind, tier, block_hash: None)

    @property
    def num_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, block_hash: bytes) -> bool:
        with self._lock:
            return block_hash in self._entries

    def keys(self) -> list[bytes]:
        """Hashes, least recently used first."""
        with self._lock:
            return list(self._entries)

    def touch(self, block_hash: bytes) -> bool:
        """Mark as just used; False when absent."""
        with self._lock:
            if block_hash not in self._entries:
                return False
            self._entries.move_to_end(block_hash)
            return True

    def get(self, block_hash: bytes) -> Any | None:
        """The payload (and it becomes most recently used), or None."""
        with self._lock:
            entry = self._entries.get(block_hash)
            if entry is None:
                return None
            self._entries.move_to_end(block_hash)
            return entry[0]

    def put(self, block_hash: bytes, payload: Any, num_bytes: int) -> tuple[bool, Evicted]:
        """Store a payload, evicting least recently used entries until it fits: (stored, evicted entries).

        A payload larger than the whole tier is not stored (and evicts nothing)."""
        if num_bytes > self.capacity_bytes:
            return False, []
        evicted: Evicted = []
        with self._lock:
            if block_hash in self._entries:
                self._entries.move_to_end(block_hash)
                return False, []
            while self._bytes + num_bytes > self.capacity_bytes:
                old_hash, (old_payload, old_bytes) = self._entries.popitem(last=False)
                self._bytes -= old_bytes
                evicted.append((old_hash, old_payload))
            self._entries[block_hash] = (payload, num_bytes)
            self._bytes += num_bytes
        for old_hash, _ in evicted:
            self._on_event("removed", self.name, old_hash)
        self._on_event("stored", self.name, block_hash)
        return True, evicted
