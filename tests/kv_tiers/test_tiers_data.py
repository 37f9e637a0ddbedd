"""The tiers as data structures: LRU byte bounds, the disk format's checks, atomic writes, a full disk."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
import torch

from tokenmill.kv_tiers.block_file import SUFFIX, TierIdentity
from tokenmill.kv_tiers.block_io import BlockIO
from tokenmill.kv_tiers.disk_tier import DiskTier
from tokenmill.kv_tiers.events import TierEvents
from tokenmill.kv_tiers.host_tier import HostTier

IDENTITY = TierIdentity({"model": "/m", "dtype": "float32", "block_size": 4})


def h(i: int) -> bytes:
    return i.to_bytes(16, "big")


def test_host_tier_lru_is_bounded_in_bytes_exactly() -> None:
    events = TierEvents()
    tier = HostTier(100, events.record)
    assert tier.put(h(1), "a", 40) == (True, [])
    assert tier.put(h(2), "b", 40) == (True, [])
    assert tier.get(h(1)) == "a"  # 1 becomes most recently used: 2 goes first
    stored, evicted = tier.put(h(3), "c", 30)
    assert stored and evicted == [(h(2), "b")]
    assert tier.num_bytes == 70 and tier.keys() == [h(1), h(3)]
    assert tier.put(h(4), "d", 30) == (True, [])  # exactly 100 bytes fits
    assert tier.num_bytes == 100
    assert tier.put(h(5), "e", 101) == (False, [])  # larger than the tier: not stored, nothing evicted
    assert tier.put(h(3), "c", 30) == (False, [])  # already there
    assert [(e.kind, e.block_hash) for e in events.take()] == [
        ("stored", h(1).hex()), ("stored", h(2).hex()), ("removed", h(2).hex()), ("stored", h(3).hex()),
        ("stored", h(4).hex())]


def _file_size(tier: DiskTier, payload: bytes) -> int:
    path = tier.path(h(999))
    assert tier.put(h(999), payload)
    size = path.stat().st_size
    tier._forget(h(999))
    path.unlink()
    return size


def test_disk_tier_lru_bound_is_exact_and_survives_restart(tmp_path: Path) -> None:
    probe = DiskTier(tmp_path, 1 << 20, IDENTITY)
    size = _file_size(probe, b"x" * 100)
    tier = DiskTier(tmp_path, 3 * size, IDENTITY)
    for i in range(3):
        assert tier.put(h(i), bytes([i]) * 100)
    assert tier.num_bytes == 3 * size
    assert bytes(tier.read(h(0))) == bytes([0]) * 100  # 0 becomes most recently used
    assert tier.put(h(3), b"\x03" * 100)
    assert sorted(tier.keys()) == [h(0), h(2), h(3)] and not tier.path(h(1)).exists()
    assert tier.num_bytes == 3 * size
    again = DiskTier(tmp_path, 3 * size, IDENTITY)  # a restart: the index comes from the folder
    assert sorted(again.keys()) == [h(0), h(2), h(3)]
    assert bytes(again.read(h(3))) == b"\x03" * 100
    smaller = DiskTier(tmp_path, 2 * size, IDENTITY)  # a smaller bound at start evicts the oldest files
    assert len(smaller) == 2 and smaller.num_bytes == 2 * size


def _rewrite(path: Path, change) -> None:
    path.write_bytes(change(path.read_bytes()))


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "foreign", "wrong_name", "garbage"])
def test_a_bad_file_is_rejected_with_a_warning_and_forgotten(tmp_path: Path, damage: str, caplog) -> None:
    tier = DiskTier(tmp_path, 1 << 20, IDENTITY)
    assert tier.put(h(1), b"\x07" * 64)
    path = tier.path(h(1))
    if damage == "corrupt":
        _rewrite(path, lambda b: b[:-1] + bytes([b[-1] ^ 1]))
    elif damage == "truncated":
        _rewrite(path, lambda b: b[:-10])
    elif damage == "foreign":  # another model's file put under our name
        foreign = DiskTier(tmp_path / "other", 1 << 20, TierIdentity({**IDENTITY.fields, "dtype": "bfloat16"}))
        assert foreign.put(h(1), b"\x07" * 64)
        path.write_bytes(foreign.path(h(1)).read_bytes())
    elif damage == "wrong_name":  # a valid file of another block renamed
        assert tier.put(h(2), b"\x07" * 64)
        path.write_bytes(tier.path(h(2)).read_bytes())
    else:
        path.write_bytes(b"not a block")
    restarted = DiskTier(tmp_path, 1 << 20, IDENTITY)
    with caplog.at_level(logging.WARNING, logger="tokenmill.kv_tiers.disk_tier"):
        assert restarted.read(h(1)) is None
    assert "ignoring" in caplog.text and h(1) not in restarted and not path.exists()
    assert restarted.num_rejected == 1


def test_a_full_disk_stops_stores_with_one_warning(tmp_path: Path, monkeypatch, caplog) -> None:
    tier = DiskTier(tmp_path, 1 << 20, IDENTITY)
    assert tier.put(h(1), b"a" * 10)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DiskTier, "_write_atomically", staticmethod(full))
    with caplog.at_level(logging.WARNING, logger="tokenmill.kv_tiers.disk_tier"):
        assert tier.put(h(2), b"b" * 10) is False
        assert tier.put(h(3), b"c" * 10) is False
    assert tier.stores_stopped and caplog.text.count("is full") == 1
    assert bytes(tier.read(h(1))) == b"a" * 10  # what is stored still reads
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [h(1).hex() + SUFFIX]


def test_a_crash_between_write_and_rename_leaves_no_readable_block(tmp_path: Path, monkeypatch) -> None:
    tier = DiskTier(tmp_path, 1 << 20, IDENTITY)

    def crash(src, dst):
        raise SystemExit("killed")  # the process dies after the temporary file is written and synced

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(SystemExit):
        tier.put(h(1), b"z" * 100)
    monkeypatch.undo()
    leftovers = list(tier.folder.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.endswith(".tmp")
    restarted = DiskTier(tmp_path, 1 << 20, IDENTITY)
    assert h(1) not in restarted and restarted.read(h(1)) is None
    assert list(restarted.folder.iterdir()) == []  # the torn write is cleaned up


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_block_io_round_trip_is_bit_identical(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    pages = [(torch.randn(2, 5, 4, 2, 3, generator=gen) * 50).to(dtype) for _ in range(2)]
    scales = [torch.rand(2, 5, 4, 2, generator=gen).half()] if dtype == torch.int8 else []
    tensors = pages + scales
    io = BlockIO(tensors, num_blocks=5)
    before = [t.clone() for t in tensors]
    payload = io.to_host(io.snapshot(3))
    assert payload.numel() == io.bytes_per_block
    for t in tensors:
        t[:, 1].zero_()
    io.write(1, payload)
    for t, b in zip(tensors, before):
        assert torch.equal(t[:, 1].contiguous().view(torch.uint8), b[:, 3].contiguous().view(torch.uint8))
        assert torch.equal(t[:, 3], b[:, 3]) and torch.equal(t[:, 0], b[:, 0])
    with pytest.raises(ValueError, match="payload is 3 bytes"):
        io.write(0, torch.zeros(3, dtype=torch.uint8))
