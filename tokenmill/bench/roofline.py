"""The speed-of-light floor for decode (BENCHMARKS.md): bytes that must cross memory / copy bandwidth."""

from __future__ import annotations

import time

import torch
from torch import nn


def measure_copy_bandwidth(device: torch.device, num_bytes: int = 256 << 20, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting read + write (as BENCHMARKS.md does)."""
    src = torch.empty(num_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: page in both buffers
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * num_bytes / best


def weight_bytes_per_token(model: nn.Module) -> int:
    """All weights are read once per decode step, except the embedding table: one row per token."""
    total = 0
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if param.data_ptr() in seen:
            continue  # tied lm_head / embedding: the lm_head read counts the whole matrix once
        seen.add(param.data_ptr())
        nbytes = param.numel() * param.element_size()
        if name.endswith("embed_tokens.weight") and not _is_tied(model):
            nbytes = param.shape[-1] * param.element_size()
        total += nbytes
    return total


def kv_bytes_per_token(model: nn.Module, context_len: int, dtype: torch.dtype) -> int:
    """KV bytes one sequence reads per step at a given context length."""
    element = torch.tensor([], dtype=dtype).element_size()
    return sum(2 * context_len * layer.num_kv_heads * layer.head_dim * element for layer in model.attention_layers())


def _is_tied(model: nn.Module) -> bool:
    embed = getattr(getattr(model, "model", model), "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    return embed is not None and head is not None and getattr(head, "weight", None) is embed.weight


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
