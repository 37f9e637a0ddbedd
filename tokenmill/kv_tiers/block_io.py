"""Copies of one KV block out of and into the device pool, as one flat byte payload.

Every layer's pages are [2, num_blocks, ...] in both attention backends' layouts, and a quantized cache's
scales are [2, num_blocks, ...] beside them (attention/base.py), so block b of a layer is `tensor[:, b]`.
A payload is those slices of every layer (pages, then scales), concatenated as bytes.
"""

from __future__ import annotations

import torch


class BlockIO:
    def __init__(self, tensors: list[torch.Tensor], num_blocks: int) -> None:
        if not tensors:
            raise ValueError("the KV tiers need at least one KV cache tensor")
        for tensor in tensors:
            if tensor.dim() < 2 or tensor.shape[0] != 2 or tensor.shape[1] < num_blocks:
                raise ValueError(f"KV tensor of shape {tuple(tensor.shape)} is not laid out [2, num_blocks, ...]")
        self.tensors = tensors
        self.device = tensors[0].device
        self._parts = [(t.dtype, (2, *t.shape[2:]), 2 * t[0, 0].numel() * t.element_size()) for t in tensors]
        self.bytes_per_block = sum(size for _, _, size in self._parts)

    def layout(self) -> list[str]:
        """Dtype and per-block shape of each part (part of the disk tier's identity)."""
        return [f"{str(dtype).removeprefix('torch.')}{list(shape)}" for dtype, shape, _ in self._parts]

    def snapshot(self, block_id: int) -> torch.Tensor:
        """A copy of the block on the device (stream-ordered before any later overwrite of the block)."""
        out = torch.empty(self.bytes_per_block, dtype=torch.uint8, device=self.device)
        offset = 0
        for tensor, (dtype, shape, size) in zip(self.tensors, self._parts):
            out[offset : offset + size].view(dtype).view(shape).copy_(tensor[:, block_id])
            offset += size
        return out

    def to_host(self, snapshot: torch.Tensor) -> torch.Tensor:
        """The snapshot in host memory (pinned on a GPU machine, so loads copy back asynchronously)."""
        if snapshot.device.type == "cpu":
            return snapshot
        host = torch.empty(snapshot.numel(), dtype=torch.uint8, pin_memory=True)
        host.copy_(snapshot)
        return host

    def write(self, block_id: int, payload: torch.Tensor) -> None:
        """Write a payload (host bytes) into device block `block_id`."""
        if payload.numel() != self.bytes_per_block:
            raise ValueError(f"KV payload is {payload.numel()} bytes, a block is {self.bytes_per_block}")
        source = payload.to(self.device, non_blocking=True)
        offset = 0
        for tensor, (dtype, shape, size) in zip(self.tensors, self._parts):
            tensor[:, block_id].copy_(source[offset : offset + size].view(dtype).view(shape))
            offset += size
