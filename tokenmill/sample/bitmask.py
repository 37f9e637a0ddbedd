"""Token bitmasks: one bit per vocabulary id, packed 32 to an int32 word (id i is bit i % 32 of word i // 32).

This is the layout grammar libraries fill (llguidance, xgrammar). Masks are filled on the CPU and
applied to the logits on whatever device they live.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

# Applying reads the int32 words as bytes, which is only the bit order above on little-endian hosts
# (x86, ARM and CUDA all are).
if sys.byteorder != "little":
    raise ImportError("tokenmill.sample.bitmask assumes a little-endian host for its token bitmasks")

# Per (device, dtype): row v holds, for the 8 ids of a mask byte of value v, the number added to their
# logits: 0 where the bit is set, -inf where it is not. bool tables give the unpacked mask itself.
_BYTE_TABLES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def bitmask_width(vocab_size: int) -> int:
    """int32 words per row for a vocabulary of `vocab_size` ids."""
    return (vocab_size + 31) // 32


def allocate_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    """A CPU int32 [num_rows, ceil(vocab_size / 32)] bitmask with every token allowed (all bits set),
    so rows no matcher fills leave their logits alone. Pinned when CUDA is present, so copying it to
    the GPU can overlap other work."""
    if num_rows < 0 or vocab_size <= 0:
        raise ValueError(f"need num_rows >= 0 and vocab_size > 0, got {num_rows}, {vocab_size}")
    shape = (num_rows, bitmask_width(vocab_size))
    pin = torch.cuda.is_available()
    try:
        return torch.full(shape, -1, dtype=torch.int32, pin_memory=pin)
    except RuntimeError:  # pinning can fail (locked-memory limits); an unpinned mask still works
        return torch.full(shape, -1, dtype=torch.int32)


def _byte_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    table = _BYTE_TABLES.get((device, dtype))
    if table is None:
        values: list[list[bool]] | list[list[float]]
        if dtype == torch.bool:
            values = [[bool((value >> bit) & 1) for bit in range(8)] for value in range(256)]
        else:
            values = [[0.0 if (value >> bit) & 1 else float("-inf") for bit in range(8)] for value in range(256)]
        table = _BYTE_TABLES[(device, dtype)] = torch.tensor(values, dtype=dtype, device=device)
    return table


def _expand(bitmask: torch.Tensor, vocab_size: int, dtype: torch.dtype, fill: bool | float) -> torch.Tensor:
    """[rows, vocab_size] of dtype, one entry per id looked up from its mask byte; ids past the mask's
    width get `fill`. A 256-row lookup is several times faster on CPU than shifting out every bit."""
    rows, width = bitmask.shape
    as_bytes = bitmask.contiguous().view(torch.uint8).reshape(-1)  # little-endian: byte j holds ids 8j .. 8j+7
    out = _byte_table(bitmask.device, dtype).index_select(0, as_bytes.int()).view(rows, width * 32)
    if vocab_size <= width * 32:
        return out[:, :vocab_size]
    pad = torch.full((rows, vocab_size - width * 32), fill, dtype=dtype, device=bitmask.device)
    return torch.cat([out, pad], dim=1)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [rows, vocab_size]: True where the token is allowed. Ids past the mask's width are not."""
    return _expand(bitmask, vocab_size, torch.bool, False)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int] | None = None) -> None:
    """In place: logits of disallowed tokens become -inf.

    logits is [num_rows, vocab_size] float on the CPU or GPU; bitmask is int32 [num_rows, width] on the
    CPU (or already on logits' device), row i masking logits row i. With `rows`, only those rows are
    masked (the structured requests of a batch); the others are left untouched.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [num_rows, vocab_size], got shape {tuple(logits.shape)}")
    if bitmask.dim() != 2 or bitmask.dtype != torch.int32:
        raise ValueError(f"bitmask must be a 2-D int32 tensor, got {bitmask.dtype} {tuple(bitmask.shape)}")
    if bitmask.shape[0] != logits.shape[0]:
        raise ValueError(f"bitmask has {bitmask.shape[0]} rows, logits {logits.shape[0]}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    mask = bitmask.to(logits.device, non_blocking=True)
    # Adding 0 / -inf is exact (x + 0 == x) and vectorizes; masked_fill_ on a scattered mask ran 3x slower on CPU.
    if rows is None:
        logits.add_(_expand(mask, logits.shape[1], logits.dtype, float("-inf")))
        return
    if len(rows) == 0:
        return
    index = torch.as_tensor(list(rows), dtype=torch.long, device=logits.device)
    selected = logits.index_select(0, index)
    selected.add_(_expand(mask.index_select(0, index), logits.shape[1], logits.dtype, float("-inf")))
    logits.index_copy_(0, index, selected)
