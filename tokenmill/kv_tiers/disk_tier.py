"""The disk tier: one file per block under <kv_disk_path>/<identity fingerprint>/, an LRU bounded in bytes.

Writes are atomic (a temporary file in the same folder, fsync, os.replace), so a crash leaves either the old
state or a whole file, and leftover temporary files are removed at start. The index is rebuilt at start
from the file names (oldest modification first); files are validated when read (block_file.decode), and a
rejected one is logged, deleted and reported as a miss, so the request recomputes. A full disk (ENOSPC)
stops stores with one warning; it never fails a request.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from tokenmill.kv_tiers.block_file import SUFFIX, BlockFileError, TierIdentity, decode, encode_header

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[0-9a-f]{32}$")


class DiskTier:
    name = "disk"

    def __init__(self, root: str | os.PathLike[str], capacity_bytes: int, identity: TierIdentity,
                 on_event: Callable[[str, str, bytes], None] | None = None) -> None:
        if capacity_bytes < 1:
            raise ValueError(f"kv_disk_bytes must be >= 1, got {capacity_bytes}")
        self.identity = identity
        self.capacity_bytes = capacity_bytes
        # One folder per identity: another model's blocks (same token hashes) never share a name with ours.
        self.folder = Path(root) / identity.fingerprint
        self.folder.mkdir(parents=True, exist_ok=True)
        self._entries: OrderedDict[bytes, int] = OrderedDict()  # hash -> file bytes; front = least recently used
        self._bytes = 0
        self._lock = threading.Lock()
        self._on_event = on_event or (lambda kind, tier, block_hash: None)
        self.stores_stopped = False  # set by a full disk
        self.num_rejected = 0
        self.num_store_errors = 0
        self._scan()

    @property
    def num_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, block_hash: bytes) -> bool:
        with self._lock:
            return block_hash in self._entries

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._entries)

    def path(self, block_hash: bytes) -> Path:
        return self.folder / (block_hash.hex() + SUFFIX)

    def _scan(self) -> None:
        found = []
        for entry in os.scandir(self.folder):
            name = entry.name
            if name.endswith(".tmp"):  # a write that never reached its rename: never readable, remove it
                _unlink(Path(entry.path))
                continue
            if not name.endswith(SUFFIX) or not _NAME.match(name[: -len(SUFFIX)]):
                continue
            stat = entry.stat()
            found.append((stat.st_mtime_ns, bytes.fromhex(name[: -len(SUFFIX)]), stat.st_size))
        for _, block_hash, size in sorted(found):
            self._entries[block_hash] = size
            self._bytes += size
        with self._lock:
            self._evict_until(0)

    def put(self, block_hash: bytes, payload: bytes | memoryview) -> bool:
        """Write a block unless present, evicting least recently used files to fit; False when not stored."""
        if self.stores_stopped:
            return False
        header = encode_header(self.identity, block_hash, payload)
        size = len(header) + len(payload)
        if size > self.capacity_bytes:
            return False
        with self._lock:
            if block_hash in self._entries:
                self._entries.move_to_end(block_hash)
                return False
            self._evict_until(size)
        path = self.path(block_hash)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self._write_atomically(tmp, path, header, payload)
        except OSError as exc:
            _unlink(tmp)
            self.num_store_errors += 1
            if exc.errno == errno.ENOSPC:
                self.stores_stopped = True
                logger.warning("KV disk tier: %s is full; no more blocks are stored on disk (requests go on)",
                               self.folder)
            else:
                logger.warning("KV disk tier: storing %s failed (%s); the block is not stored", path.name, exc)
            return False
        with self._lock:
            self._entries[block_hash] = size
            self._bytes += size
            self._evict_until(0)  # a concurrent store may have taken the room meanwhile
        self._on_event("stored", self.name, block_hash)
        return True

    @staticmethod
    def _write_atomically(tmp: Path, path: Path, header: bytes, payload: bytes | memoryview) -> None:
        with open(tmp, "wb") as file:
            file.write(header)
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)

    def read(self, block_hash: bytes) -> memoryview | None:
        """The block's payload, checked against its header; None when absent or rejected (with a warning)."""
        with self._lock:
            if block_hash not in self._entries:
                return None
            self._entries.move_to_end(block_hash)
        path = self.path(block_hash)
        try:
            data = path.read_bytes()
            return decode(data, self.identity, block_hash)
        except FileNotFoundError:
            self._forget(block_hash)
            return None
        except (BlockFileError, OSError) as exc:
            self.num_rejected += 1
            logger.warning("KV disk tier: ignoring %s: %s; the request recomputes these tokens", path, exc)
            self._forget(block_hash)
            _unlink(path)
            return None

    def _forget(self, block_hash: bytes) -> None:
        with self._lock:
            size = self._entries.pop(block_hash, None)
            if size is None:
                return
            self._bytes -= size
        self._on_event("removed", self.name, block_hash)

    def _evict_until(self, room: int) -> None:
        """Delete least recently used files until `room` more bytes fit (the caller holds the lock)."""
        while self._entries and self._bytes + room > self.capacity_bytes:
            block_hash, size = self._entries.popitem(last=False)
            self._bytes -= size
            _unlink(self.path(block_hash))
            self._on_event("removed", self.name, block_hash)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
