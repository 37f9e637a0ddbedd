"""What the tiers report: KV events for a router (blocks stored / removed, by hash) and cumulative counters."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

MAX_PENDING_EVENTS = 65536  # untaken events beyond this drop the oldest: nobody may be reading them


@dataclass(frozen=True)
class KVEvent:
    kind: str  # "stored" or "removed"
    tier: str  # "host" or "disk"
    block_hash: str  # hex of the chained block hash (core/prefix_cache.py)


class TierEvents:
    """Thread-safe: the copier, disk writer and loader threads record, the engine takes."""

    def __init__(self, max_pending: int = MAX_PENDING_EVENTS) -> None:
        self._events: deque[KVEvent] = deque(maxlen=max_pending)
        self._lock = threading.Lock()
        self.num_dropped = 0

    def record(self, kind: str, tier: str, block_hash: bytes) -> None:
        with self._lock:
            if len(self._events) == self._events.maxlen:
                self.num_dropped += 1
            self._events.append(KVEvent(kind, tier, block_hash.hex()))

    def take(self) -> list[KVEvent]:
        with self._lock:
            events = list(self._events)
            self._events.clear()
        return events


class TierCounters:
    """Cumulative counters (thread-safe adds); names are the engine-stats keys without the kv_tier_ prefix."""

    NAMES = ("host_hit_blocks", "disk_hit_blocks", "bytes_device_to_host", "bytes_host_to_device",
             "bytes_host_to_disk", "bytes_disk_to_host", "loads", "load_seconds_total", "load_seconds_max",
             "stores_dropped", "disk_files_rejected", "disk_store_errors")

    def __init__(self) -> None:
        self._values: dict[str, float] = dict.fromkeys(self.NAMES, 0)
        self._lock = threading.Lock()

    def add(self, name: str, amount: float = 1) -> None:
        with self._lock:
            self._values[name] += amount

    def observe_load(self, seconds: float) -> None:
        with self._lock:
            self._values["loads"] += 1
            self._values["load_seconds_total"] += seconds
            self._values["load_seconds_max"] = max(self._values["load_seconds_max"], seconds)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)
