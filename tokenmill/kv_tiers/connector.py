"""TierConnector: the engine-side KV tiers (core/tier_io.py's KVTierConnector), with their threads.

    device eviction --snapshot--> store queue --copier--> host tier --host eviction--> disk queue --writer--> disk
    (without a host tier the copier hands blocks straight to the disk queue)
    start_load --> load queue --loader--> host tier, else disk (read + checked) --> staged payloads
    finished_loads (engine thread, at the next schedule): staged payloads written into their device blocks

Queues of stores are bounded and a full one drops the store: the step never waits on a tier. Only the engine
thread touches the device pool (snapshots and writes), so a cancelled load can never write a block that
another request got meanwhile.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenmill.kv_tiers.block_file import TierIdentity
from tokenmill.kv_tiers.block_io import BlockIO
from tokenmill.kv_tiers.disk_tier import DiskTier
from tokenmill.kv_tiers.events import KVEvent, TierCounters, TierEvents
from tokenmill.kv_tiers.host_tier import HostTier

logger = logging.getLogger(__name__)

STORE_QUEUE_BLOCKS = 256  # device snapshots waiting for the copier (bounds the memory they hold)
DISK_QUEUE_BLOCKS = 1024


@dataclass
class _Load:
    job: int
    request_id: str
    block_hashes: list[bytes]
    block_ids: list[int]
    started: float
    payloads: list[torch.Tensor] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


class TierConnector:
    def __init__(self, block_io: BlockIO, block_size: int, host_bytes: int, disk_path: str | None,
                 disk_bytes: int, identity: TierIdentity) -> None:
        self.io = block_io
        self.block_size = block_size
        self.events = TierEvents()
        self.counters = TierCounters()
        self.host = HostTier(host_bytes, self.events.record) if host_bytes > 0 else None
        self.disk = DiskTier(disk_path, disk_bytes, identity, self.events.record) if disk_path else None
        if self.host is None and self.disk is None:
            raise ValueError("a TierConnector needs a host tier, a disk tier or both")
        self._store_queue: queue.Queue[tuple[bytes, torch.Tensor] | None] = queue.Queue(STORE_QUEUE_BLOCKS)
        self._disk_queue: queue.Queue[tuple[bytes, torch.Tensor] | None] = queue.Queue(DISK_QUEUE_BLOCKS)
        self._load_queue: queue.Queue[_Load | None] = queue.Queue()
        self._jobs = itertools.count()
        self._pending: dict[str, int] = {}  # request id -> its live load's job (engine thread only)
        self._done: list[_Load] = []
        self._done_lock = threading.Lock()
        self._load_done = threading.Event()
        # Blocks on their way down (in the store or disk queue): still found by lookups and loads, so a block is
        # never in no tier between leaving one and reaching the next.
        self._in_flight: dict[bytes, torch.Tensor] = {}
        self._in_flight_lock = threading.Lock()
        self._threads = [threading.Thread(target=loop, name=f"kv-tier-{name}", daemon=True)
                         for name, loop in (("copier", self._copier), ("disk", self._disk_writer),
                                            ("loader", self._loader))]
        for thread in self._threads:
            thread.start()

    # ---- core/tier_io.KVTierConnector ----------------------------------------------------------

    def on_evict(self, block_id: int, block_hash: bytes) -> None:
        if self.host is not None:
            if self.host.touch(block_hash):
                return
        elif self.disk is not None and block_hash in self.disk:
            return
        if self._store_queue.full():
            self.counters.add("stores_dropped")
            return
        snapshot = self.io.snapshot(block_id)
        self._set_in_flight(block_hash, snapshot)
        self._store_queue.put_nowait((block_hash, snapshot))

    def num_tier_hits(self, block_hashes: Sequence[bytes]) -> int:
        count = 0
        for block_hash in block_hashes:
            if not ((self.host is not None and block_hash in self.host) or block_hash in self._in_flight
                    or (self.disk is not None and block_hash in self.disk)):
                break
            count += 1
        return count

    def start_load(self, request_id: str, block_hashes: list[bytes], block_ids: list[int]) -> None:
        job = next(self._jobs)
        self._pending[request_id] = job
        self._load_queue.put(_Load(job, request_id, list(block_hashes), list(block_ids), time.perf_counter()))

    def finished_loads(self) -> dict[str, int]:
        with self._done_lock:
            done, self._done = self._done, []
            self._load_done.clear()
        result: dict[str, int] = {}
        for load in done:
            if self._pending.get(load.request_id) != load.job:
                continue  # cancelled (the request ended): its blocks may belong to someone else by now
            del self._pending[load.request_id]
            for block_id, payload, source in zip(load.block_ids, load.payloads, load.sources):
                self.io.write(block_id, payload)
                self.counters.add(f"{source}_hit_blocks")
                self.counters.add("bytes_host_to_device", payload.numel())
            self.counters.observe_load(time.perf_counter() - load.started)
            result[load.request_id] = len(load.payloads)
        return result

    def cancel_load(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    # ---- for the engine -----------------------------------------------------------------------

    def wait_for_loads(self, timeout: float) -> None:
        """Sleep until a load finishes or `timeout` passes (the engine has nothing else to run)."""
        self._load_done.wait(timeout)

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until every queued store reached its tier (tests, benchmarks, before a planned restart)."""
        deadline = time.monotonic() + timeout
        for q in (self._store_queue, self._disk_queue):
            while q.unfinished_tasks and time.monotonic() < deadline:
                time.sleep(0.001)

    def persist(self, cached_blocks: list[tuple[int, bytes]]) -> int:
        """Write these device blocks and the host tier's blocks to the disk tier (those not there yet) and wait:
        what a planned shutdown does, so the next start finds the hot prefixes too. Blocks written."""
        if self.disk is None:
            return 0
        sources: list[tuple[bytes, Any]] = [(h, block_id) for block_id, h in cached_blocks]
        sources += [(h, None) for h in (self.host.keys() if self.host is not None else [])]
        written = 0
        for block_hash, block_id in sources:
            if block_hash in self.disk or block_hash in self._in_flight:
                continue
            payload = self.io.to_host(self.io.snapshot(block_id)) if block_id is not None else \
                (self.host.get(block_hash) if self.host is not None else None)
            if payload is None:
                continue
            self._set_in_flight(block_hash, payload)
            self._disk_queue.put((block_hash, payload))  # blocking: this is not the step's hot path
            written += 1
        self.flush()
        return written

    def take_events(self) -> list[KVEvent]:
        return self.events.take()

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.counters.snapshot()
        stats["host_hit_tokens"] = stats["host_hit_blocks"] * self.block_size
        stats["disk_hit_tokens"] = stats["disk_hit_blocks"] * self.block_size
        stats["events_dropped"] = self.events.num_dropped
        for name, tier in (("host", self.host), ("disk", self.disk)):
            stats[f"{name}_bytes"] = tier.num_bytes if tier is not None else 0
            stats[f"{name}_blocks"] = len(tier) if tier is not None else 0
            stats[f"{name}_capacity_bytes"] = tier.capacity_bytes if tier is not None else 0
        if self.disk is not None:
            stats["disk_files_rejected"] = self.disk.num_rejected
            stats["disk_store_errors"] = self.disk.num_store_errors
        return {f"kv_tier_{k}": v for k, v in stats.items()}

    def close(self) -> None:
        for q in (self._store_queue, self._disk_queue, self._load_queue):
            q.put(None)
        for thread in self._threads:
            thread.join(timeout=10)

    # ---- threads -------------------------------------------------------------------------------

    def _copier(self) -> None:
        while (item := self._store_queue.get()) is not None:
            try:
                self._store(*item)
            except Exception:  # noqa: BLE001 - a failed store loses a cache entry, never a request
                logger.exception("KV tier: storing a block failed")
                self._clear_in_flight(*item)
            finally:
                self._store_queue.task_done()

    def _store(self, block_hash: bytes, snapshot: torch.Tensor) -> None:
        payload = self.io.to_host(snapshot)
        self.counters.add("bytes_device_to_host", payload.numel())
        if self.host is None:
            self._to_disk(block_hash, payload)  # the in-flight entry now stays until the disk writer is done
            if payload is not snapshot:
                self._clear_in_flight(block_hash, snapshot)
            return
        _, evicted = self.host.put(block_hash, payload, payload.numel())
        self._clear_in_flight(block_hash, snapshot)
        for old_hash, old_payload in evicted:
            self._to_disk(old_hash, old_payload)

    def _to_disk(self, block_hash: bytes, payload: torch.Tensor) -> None:
        if self.disk is None or self.disk.stores_stopped:
            return
        self._set_in_flight(block_hash, payload)
        try:
            self._disk_queue.put_nowait((block_hash, payload))
        except queue.Full:
            self._clear_in_flight(block_hash, payload)
            self.counters.add("stores_dropped")

    def _set_in_flight(self, block_hash: bytes, payload: torch.Tensor) -> None:
        with self._in_flight_lock:
            self._in_flight[block_hash] = payload

    def _clear_in_flight(self, block_hash: bytes, payload: torch.Tensor) -> None:
        with self._in_flight_lock:
            if self._in_flight.get(block_hash) is payload:  # not a newer copy of the same block
                del self._in_flight[block_hash]

    def _disk_writer(self) -> None:
        while (item := self._disk_queue.get()) is not None:
            try:
                block_hash, payload = item
                if self.disk is not None and self.disk.put(block_hash, memoryview(payload.numpy())):
                    self.counters.add("bytes_host_to_disk", payload.numel())
            except Exception:  # noqa: BLE001
                logger.exception("KV tier: writing a block to disk failed")
            finally:
                self._clear_in_flight(*item)
                self._disk_queue.task_done()

    def _loader(self) -> None:
        while (load := self._load_queue.get()) is not None:
            try:
                self._read(load)
            except Exception:  # noqa: BLE001 - what was read stands; the rest is recomputed
                logger.exception("KV tier: loading blocks failed")
            with self._done_lock:
                self._done.append(load)
                self._load_done.set()

    def _read(self, load: _Load) -> None:
        pin = self.io.device.type == "cuda"
        for block_hash in load.block_hashes:
            payload = self.host.get(block_hash) if self.host is not None else None
            if payload is None:
                with self._in_flight_lock:
                    payload = self._in_flight.get(block_hash)
            source = "host"
            if payload is None and self.disk is not None:
                data = self.disk.read(block_hash)
                if data is not None and len(data) == self.io.bytes_per_block:
                    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                    payload = payload.pin_memory() if pin else payload
                    self.counters.add("bytes_disk_to_host", payload.numel())
                    source = "disk"
            if payload is None:
                break
            load.payloads.append(payload)
            load.sources.append(source)
