"""The disk tier's file format: one file per KV block, named by its chained block hash.

    MAGIC (8 bytes) | header length (u32 little-endian) | header (JSON) | payload

The header carries the identity of what produced the KV (model, its config hash, dtype, block size, KV-cache
dtype, tokenizer hash, page layout), the block hash, the payload length and its blake2b checksum. A file
whose identity differs, whose payload is short or long, or whose checksum fails is rejected, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAGIC = b"TMKVBLK1"
SUFFIX = ".kvb"
_LENGTH = struct.Struct("<I")
MAX_HEADER_BYTES = 1 << 20


class BlockFileError(ValueError):
    """A disk-tier file that must not be loaded; the message says why."""


@dataclass(frozen=True)
class TierIdentity:
    """What must match for stored KV to be valid: a different model, dtype or layout makes other KV."""

    fields: Mapping[str, Any]

    @property
    def fingerprint(self) -> str:
        return hashlib.blake2b(json.dumps(dict(self.fields), sort_keys=True).encode(), digest_size=16).hexdigest()


def checksum(payload: bytes | memoryview) -> str:
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


def encode_header(identity: TierIdentity, block_hash: bytes, payload: bytes | memoryview) -> bytes:
    """Everything before the payload (the payload is written after it, without a copy)."""
    header = json.dumps({
        "version": 1,
        "fingerprint": identity.fingerprint,
        "identity": dict(identity.fields),
        "block_hash": block_hash.hex(),
        "payload_bytes": len(payload),
        "checksum": checksum(payload),
    }, sort_keys=True).encode()
    return MAGIC + _LENGTH.pack(len(header)) + header


def decode(data: bytes, identity: TierIdentity, block_hash: bytes) -> memoryview:
    """The payload of a file's bytes, or BlockFileError saying what is wrong."""
    view = memoryview(data)
    start = len(MAGIC) + _LENGTH.size
    if len(data) < start or bytes(view[: len(MAGIC)]) != MAGIC:
        raise BlockFileError("not a tokenmill KV block file (bad magic or truncated header)")
    (header_len,) = _LENGTH.unpack_from(data, len(MAGIC))
    if header_len > MAX_HEADER_BYTES or start + header_len > len(data):
        raise BlockFileError(f"header length {header_len} does not fit the {len(data)}-byte file (truncated?)")
    try:
        header = json.loads(bytes(view[start : start + header_len]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BlockFileError(f"unreadable header ({exc})") from exc
    if not isinstance(header, dict):
        raise BlockFileError("header is not a JSON object")
    if header.get("fingerprint") != identity.fingerprint or header.get("identity") != dict(identity.fields):
        differences = _identity_diff(header.get("identity"), identity)
        raise BlockFileError(f"written for another model or KV layout ({differences})")
    if header.get("block_hash") != block_hash.hex():
        raise BlockFileError(f"holds block {header.get('block_hash')!r}, not {block_hash.hex()}")
    payload = view[start + header_len :]
    if len(payload) != header.get("payload_bytes"):
        raise BlockFileError(f"payload is {len(payload)} bytes, the header says {header.get('payload_bytes')} "
                             f"(truncated?)")
    if checksum(payload) != header.get("checksum"):
        raise BlockFileError("payload checksum mismatch (corrupt)")
    return payload


def _identity_diff(found: Any, identity: TierIdentity) -> str:
    if not isinstance(found, dict):
        return "no identity"
    keys = sorted(k for k in set(found) | set(identity.fields) if found.get(k) != identity.fields.get(k))
    shown = [f"{k}: file {found.get(k)!r} vs engine {identity.fields.get(k)!r}" for k in keys[:4]]
    return ", ".join(shown) or "fingerprint"
