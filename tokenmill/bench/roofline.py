"""The memory-bandwidth ceiling of decode (BENCHMARKS.md): bytes read per step / measured bandwidth."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tokenmill.layers.moe import SparseMoeBlock
from tokenmill.quant.kv_cache import kv_bytes_per_token_head

# A streaming read through a buffer k times the last-level cache finds at most ~1/k of it still cached
# (less under LRU), so 4x keeps the cache's help under a few percent. Bounds: 256 MiB is already far past
# any desktop's L3; 2 GiB caps the cost (about 1 s to fill and read on 2 cores) on machines, like this
# VM, that report a large host L3 (480 MiB -> 1.9 GiB).
CACHE_MULTIPLE = 4
MIN_READ_BUFFER = 256 << 20
MAX_READ_BUFFER = 2 << 30
GEMV_COLUMNS = 4096  # the read is a matrix-vector product, the way decode reads its weights


@dataclass(frozen=True)
class Bandwidth:
    bytes_per_s: float
    kind: str  # what was measured: "read" (CPU) or "copy, read + write" (GPU)


def measure_bandwidth(device: torch.device) -> Bandwidth:
    """The bandwidth the ceiling divides by: CPU read bandwidth, or GPU device-to-device copy bandwidth."""
    if device.type == "cpu":
        return Bandwidth(measure_cpu_read_bandwidth(), "read")
    return Bandwidth(measure_copy_bandwidth(device), "copy, read + write")


def measure_cpu_read_bandwidth(num_bytes: int | None = None, repeats: int = 5) -> float:
    """Bytes/s read from DRAM with all torch threads: the best of `repeats` passes over a buffer well past
    the last-level cache (see CACHE_MULTIPLE)."""
    num_bytes = num_bytes or read_buffer_bytes(last_level_cache_bytes())
    rows = max(1, num_bytes // (4 * GEMV_COLUMNS))
    matrix = torch.ones(rows, GEMV_COLUMNS, dtype=torch.float32)  # ones, not empty: pages must be touched
    vector = torch.ones(GEMV_COLUMNS, dtype=torch.float32)
    torch.mv(matrix, vector)  # warm-up: thread pool up, code paths loaded
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mv(matrix, vector)
        best = min(best, time.perf_counter() - start)
    return matrix.numel() * matrix.element_size() / best


def read_buffer_bytes(llc_bytes: int | None) -> int:
    if llc_bytes is None:
        return MAX_READ_BUFFER  # unknown cache: the safe end
    return min(max(CACHE_MULTIPLE * llc_bytes, MIN_READ_BUFFER), MAX_READ_BUFFER)


def last_level_cache_bytes(cache_dir: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """Size of the highest cache level Linux reports for CPU 0, or None where sysfs does not say."""
    levels: list[tuple[int, int]] = []
    for index in cache_dir.glob("index*"):
        try:
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        if size[-1:].upper() in units and size[:-1].isdigit():
            levels.append((level, int(size[:-1]) * units[size[-1].upper()]))
        elif size.isdigit():
            levels.append((level, int(size)))
    return max(levels)[1] if levels else None


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


def weight_bytes_per_step(model: nn.Module, batch_size: int = 1) -> int:
    """Weight bytes one decode step reads: every parameter once, by its real storage size (so packed or
    int8 weights count what they are), except the embedding table, of which one row per token is read.
    A tied LM head reads the whole table once, which covers the rows. A mixture-of-experts layer reads only
    the experts its tokens route to: top-k of them at batch 1; for a batch this counts min(experts,
    batch x top-k), as if its tokens picked different experts (routing is not known before the step)."""
    experts_read = {id(param): (block.experts.num_experts, min(block.experts.num_experts, batch_size * block.top_k))
                    for block in model.modules() if isinstance(block, SparseMoeBlock)
                    for param in block.experts.parameters()}
    total = 0
    for name, param in model.named_parameters():  # tied parameters come once
        if name.endswith("embed_tokens.weight") and not _lm_head_is_embedding(model):
            total += batch_size * param[0].numel() * param.element_size()
        elif id(param) in experts_read:
            num_experts, read = experts_read[id(param)]
            total += param.numel() // num_experts * read * param.element_size()
        else:
            total += param.numel() * param.element_size()
    return total


def kv_bytes_per_sequence(model: nn.Module, context_len: int, dtype: torch.dtype) -> int:
    """KV bytes one sequence reads per step at a given context length, in the cache's own dtype (a quantized
    cache's scales included; `dtype` only where no cache is bound yet)."""
    total = 0
    for layer in model.attention_layers():
        cache = getattr(layer, "kv_cache", None)
        cache_dtype = cache.dtype if isinstance(cache, torch.Tensor) else dtype
        total += 2 * context_len * layer.num_kv_heads * kv_bytes_per_token_head(cache_dtype, layer.head_dim)
    return total


def _lm_head_is_embedding(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False):
        return True
    embed = getattr(getattr(model, "model", model), "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    return embed is not None and head is not None and getattr(head, "weight", None) is embed.weight


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
