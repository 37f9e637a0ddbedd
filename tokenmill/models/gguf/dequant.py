"""Dequantize GGUF tensor bytes to float32 torch tensors, vectorized over blocks.

The common types are done here in torch: numpy's `gguf.quants.dequantize` takes ~2 s for a 135M Q4_1 model,
these ~10x less. The arithmetic follows the ggml reference order step by step (scale * quant, then the
offset), so results equal `gguf.quants.dequantize` bit for bit (tests/model/test_gguf_dequant.py). Rarer
types (Q2_K, Q3_K, the IQ and TQ families) fall back to `gguf.quants` when the `gguf` package is
installed (`pip install 'tokenmill[gguf]'`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from tokenmill.models.gguf.ggml_types import GGML_TYPES

_K = 256  # elements of a K-quant super-block


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte `start` of every block, as float32 [n_blocks, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, m] bytes -> [n, 2m]: the m low nibbles, then the m high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


# Block parts: the scale (and min) of each block and its codes in element order. The dequantizers below and
# the repacking into tokenmill's quantized layout (gguf/canonical.py) both read blocks through these.

def q4_0_parts(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 blocks -> (d [n, 1] float32, codes [n, 32] uint8 0..15); W = d * (code - 8)."""
    return _f16(b, 0), _nibbles(b[:, 2:])


def q4_1_parts(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 blocks -> (d, m [n, 1] float32, codes [n, 32] uint8 0..15); W = d * code + m."""
    return _f16(b, 0), _f16(b, 2), _nibbles(b[:, 4:])


def q8_0_parts(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 blocks -> (d [n, 1] float32, codes [n, 32] int8); W = code * d."""
    return _f16(b, 0), b[:, 2:].contiguous().view(torch.int8)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d, q = q4_0_parts(b)
    return d * (q.to(torch.int8) - 8).float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m, q = q4_1_parts(b)
    return d * q.float() + m


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes holding 32 bits -> [n, 32]: bit j of the little-endian word, for element j."""
    bits = (qh.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(qh.shape[0], 32)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6]) << 4)
    return _f16(b, 0) * (q.to(torch.int8) - 16).float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8]) << 4)
    return _f16(b, 0) * q.float() + _f16(b, 2)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d, q = q8_0_parts(b)
    return q.float() * d


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of a Q4_K/Q5_K super-block -> 8 six-bit scales and 8 six-bit mins (float32)."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _sub_block_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes -> [n, 8, 32]: each 32-byte group gives one sub-block of low nibbles, then one of high."""
    groups = qs.reshape(-1, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    return (groups & 0x0F).reshape(-1, 8, 32)


def q4_k_parts(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K super-blocks -> (scale, offset [n, 8, 1] float32, codes [n, 8, 32] uint8 0..15) per 32-element
    sub-block; W = scale * code - offset."""
    sc, mn = _k_scales(b[:, 4:16])
    scale, offset = (_f16(b, 0) * sc).unsqueeze(-1), (_f16(b, 2) * mn).unsqueeze(-1)
    return scale, offset, _sub_block_nibbles(b[:, 16:])


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    scale, offset, q = q4_k_parts(b)
    return (scale * q.float() - offset).reshape(-1, _K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    sc, mn = _k_scales(b[:, 4:16])
    scale, offset = (_f16(b, 0) * sc).unsqueeze(-1), (_f16(b, 2) * mn).unsqueeze(-1)
    high = (b[:, 16:48].unsqueeze(1) >> torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)) & 1  # [n, 8, 32]
    q = _sub_block_nibbles(b[:, 48:]) | (high << 4)
    return (scale * q.float() - offset).reshape(-1, _K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    low = b[:, :128].reshape(n, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    low = (low & 0x0F).reshape(n, 8, 32)
    high = b[:, 128:192].reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    high = (high & 0x03).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    scale = (_f16(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()).unsqueeze(-1)
    return (scale * q).reshape(n, _K)


def _plain(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda b: b.reshape(-1).view(dtype).float()


# Type name -> blocks [n_blocks, type_size] uint8 -> float32 [n_blocks, block_size].
_TORCH_DEQUANT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "F32": _plain(torch.float32), "F16": _plain(torch.float16), "BF16": _plain(torch.bfloat16),
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}
NATIVE_TYPES = tuple(_TORCH_DEQUANT)


class UnsupportedType(Exception):
    """The tensor type cannot be dequantized here; the message continues "tensor X has type T"."""


Dequantizer = Callable[[np.ndarray, tuple[int, ...]], torch.Tensor]


def load_dequantizer(type_id: int) -> Dequantizer:
    """The function turning a tensor's bytes (uint8) into a float32 tensor of its shape, or UnsupportedType."""
    known = GGML_TYPES.get(type_id)
    if known is not None and known.name in _TORCH_DEQUANT:
        function, type_size = _TORCH_DEQUANT[known.name], known.type_size
        return lambda raw, shape: function(torch.from_numpy(raw).reshape(-1, type_size)).reshape(shape)
    try:
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize as numpy_dequantize
    except ImportError as exc:
        raise UnsupportedType(f", which needs the gguf package (pip install 'tokenmill[gguf]'; built in: "
                              f"{', '.join(NATIVE_TYPES)})") from exc
    try:  # one block of zeros: does gguf know how to dequantize this type
        qtype = GGMLQuantizationType(type_id)
        numpy_dequantize(np.zeros(GGML_TYPES[type_id].type_size, dtype=np.uint8), qtype)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise UnsupportedType(f", not supported (supported: {', '.join(NATIVE_TYPES)}, and through the gguf "
                              "package Q2_K, Q3_K and the IQ/TQ types)") from exc

    def fallback(raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
        values = numpy_dequantize(raw.reshape(shape[:-1] + (-1,)), qtype)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)

    return fallback


def dequantize(raw: np.ndarray, type_id: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor's bytes (uint8) -> float32 tensor of `shape` (F32 may share `raw`); UnsupportedType if unknown."""
    return load_dequantizer(type_id)(raw, shape)
