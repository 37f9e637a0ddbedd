"""Parse a GGUF file: its metadata key-values and tensor table, with the tensor bytes mapped, not read.

Written against the format (magic, version 2/3, little-endian key-values, aligned tensor data) rather than
with `gguf.GGUFReader`, which builds a numpy view per array element and takes seconds on a vocabulary of
50k strings; this parser takes tens of milliseconds. Every failure is a ModelLoadError naming the file.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tokenmill.errors import ModelLoadError
from tokenmill.models.gguf import GGUF_MAGIC
from tokenmill.models.gguf.ggml_types import GGML_TYPES

_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
# Scalar value types: GGUF type id -> struct format (8 is a string, 9 an array).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: the file lists the fastest-varying dimension first
    type_id: int
    offset: int  # from the start of the file
    nbytes: int  # -1 for a type the format table does not know

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class _Truncated(Exception):
    """The header runs past the end of the file."""


class GGUFFile:
    """One GGUF file: `metadata` (key -> value; arrays of numbers as numpy arrays), `tensors` by name."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with self.path.open("rb") as f:
                size = self.path.stat().st_size
                # Copy-on-write: numpy/torch views over it are writable (torch.from_numpy needs that); the file
                # itself is never written.
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else b""
        except OSError as exc:
            raise ModelLoadError(f"{self.path}: cannot open ({exc})") from exc
        if self._map[:4] != GGUF_MAGIC:
            raise self.error("not a GGUF file (it does not start with the GGUF magic bytes)")
        try:
            self.version = _U32.unpack_from(self._map, 4)[0]
            if self.version not in (2, 3):
                raise self.error(f"GGUF version {self.version} is not supported (supported: 2, 3)")
            self.metadata, pos = self._read_metadata()
            self.tensors, pos = self._read_tensor_table(pos)
        except (_Truncated, struct.error) as exc:
            raise self.error("truncated: the header ends before its key-values and tensor table do") from exc
        alignment = int(self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = -(-pos // alignment) * alignment
        self.tensors = {name: _shift(info, data_start) for name, info in self.tensors.items()}
        for info in self.tensors.values():
            if info.nbytes >= 0 and info.offset + info.nbytes > len(self._map):
                raise self.error(f"truncated: tensor {info.name} ends at byte {info.offset + info.nbytes}, "
                                 f"the file has {len(self._map)}")

    def error(self, message: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: {message}")

    def raw(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes as a uint8 array over the mapped file (no copy)."""
        return np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    # ---- parsing -----------------------------------------------------------------------------------------

    def _read_metadata(self) -> tuple[dict[str, Any], int]:
        num_tensors, num_kv = _U64.unpack_from(self._map, 8)[0], _U64.unpack_from(self._map, 16)[0]
        self._num_tensors = num_tensors
        pos = 24
        metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key, pos = self._string(pos)
            value_type = _U32.unpack_from(self._map, pos)[0]
            metadata[key], pos = self._value(value_type, pos + 4, key)
        return metadata, pos

    def _read_tensor_table(self, pos: int) -> tuple[dict[str, TensorInfo], int]:
        tensors: dict[str, TensorInfo] = {}
        for _ in range(self._num_tensors):
            name, pos = self._string(pos)
            n_dims = _U32.unpack_from(self._map, pos)[0]
            dims = struct.unpack_from(f"<{n_dims}Q", self._map, pos + 4)
            pos += 4 + 8 * n_dims
            type_id = _U32.unpack_from(self._map, pos)[0]
            offset = _U64.unpack_from(self._map, pos + 4)[0]
            pos += 12
            shape = tuple(int(d) for d in reversed(dims))
            info = TensorInfo(name, shape, type_id, offset, -1)
            known = GGML_TYPES.get(type_id)
            if known is not None:
                info = TensorInfo(name, shape, type_id, offset, info.numel // known.block_size * known.type_size)
            tensors[name] = info
        return tensors, pos

    def _string(self, pos: int) -> tuple[str, int]:
        length = _U64.unpack_from(self._map, pos)[0]
        end = pos + 8 + length
        if end > len(self._map):
            raise _Truncated
        return str(self._map[pos + 8 : end], "utf-8", "replace"), end

    def _value(self, value_type: int, pos: int, key: str) -> tuple[Any, int]:
        if value_type in _SCALARS:
            fmt = _SCALARS[value_type]
            return struct.unpack_from(fmt, self._map, pos)[0], pos + struct.calcsize(fmt)
        if value_type == _STRING:
            return self._string(pos)
        if value_type != _ARRAY:
            raise self.error(f"metadata key {key!r} has unknown value type {value_type}")
        item_type = _U32.unpack_from(self._map, pos)[0]
        count = _U64.unpack_from(self._map, pos + 4)[0]
        pos += 12
        if item_type in _NUMPY:
            dtype = np.dtype(_NUMPY[item_type])
            if pos + count * dtype.itemsize > len(self._map):
                raise _Truncated
            return np.frombuffer(self._map, dtype=dtype, count=count, offset=pos), pos + count * dtype.itemsize
        read: Callable[[int], tuple[Any, int]] = (
            self._string if item_type == _STRING else (lambda p: self._value(item_type, p, key)))
        items = []
        for _ in range(count):  # the vocabulary: ~100k strings, a plain loop is fast enough
            item, pos = read(pos)
            items.append(item)
        return items, pos


def _shift(info: TensorInfo, data_start: int) -> TensorInfo:
    return TensorInfo(info.name, info.shape, info.type_id, info.offset + data_start, info.nbytes)
