"""How many bytes the KV pool gets: a fixed budget, or what a GPU has left after the weights and a worst-case step.

Three ways, first match wins:
- `kv_cache_memory` (--kv-cache-memory 4GiB): exactly that, on any device; nothing is measured;
- on the CPU: `kv_cache_memory_bytes` (--kv-cache-memory-gb);
- on a GPU: profile. Run the largest step the scheduler can send (max_num_batched_tokens tokens and their
  logits) on a scratch cache, take its peak, and give the pool what is left of
  gpu_memory_utilization x total memory after what the engine already holds (weights, draft model, buffers),
  that peak, and memory outside PyTorch's allocator (the CUDA context, cuBLAS workspaces).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tokenmill.attention.metadata import build_attention_metadata, forward_context
from tokenmill.byte_sizes import format_bytes
from tokenmill.config import CacheConfig
from tokenmill.errors import ConfigError
from tokenmill.layers.attention import Attention
from tokenmill.worker.kv_cache_alloc import allocate_kv_caches


@dataclass(frozen=True)
class GpuMemoryProfile:
    total_bytes: int  # the device's memory
    resident_bytes: int  # held by PyTorch before the step: weights, a draft model, persistent buffers
    step_peak_bytes: int  # extra peak of the worst-case step (activations, logits) above resident_bytes
    non_torch_bytes: int  # used on the device outside PyTorch's allocator: CUDA context, library workspaces


def kv_cache_budget(cache: CacheConfig, device: torch.device, measure: Callable[[], GpuMemoryProfile],
                    max_num_batched_tokens: int) -> int:
    """Bytes for the KV pool (see the module doc); `measure` runs only when the GPU must be profiled."""
    if cache.kv_cache_memory is not None:
        return cache.kv_cache_memory
    if device.type != "cuda":
        return cache.kv_cache_memory_bytes
    return budget_from_profile(measure(), cache.gpu_memory_utilization, max_num_batched_tokens)


def budget_from_profile(profile: GpuMemoryProfile, utilization: float, max_num_batched_tokens: int) -> int:
    """What gpu_memory_utilization of the device leaves for KV after the model and a worst-case step;
    ConfigError naming the setting to change when nothing is left."""
    allowed = int(utilization * profile.total_bytes)
    held = profile.resident_bytes + profile.non_torch_bytes
    of_device = f"gpu_memory_utilization={utilization} of the GPU's {format_bytes(profile.total_bytes)} " \
                f"({format_bytes(allowed)})"
    if held > allowed:
        if utilization < 1:
            raise ConfigError("gpu_memory_utilization",
                              f"the model and the CUDA context take {format_bytes(held)}, more than {of_device}; "
                              f"raise gpu_memory_utilization, or use a smaller dtype or model")
        raise ConfigError("model", f"the model and the CUDA context take {format_bytes(held)}, more than the "
                                   f"GPU's {format_bytes(profile.total_bytes)}; use a smaller dtype or model")
    budget = allowed - held - profile.step_peak_bytes
    if budget <= 0:
        raise ConfigError("max_num_batched_tokens",
                          f"a step of {max_num_batched_tokens} tokens needs {format_bytes(profile.step_peak_bytes)} "
                          f"beyond the model's {format_bytes(held)}, leaving no KV memory within {of_device}; "
                          f"lower max_num_batched_tokens (or raise gpu_memory_utilization)")
    return budget


def measure_gpu_memory(device: torch.device, run_worst_case_step: Callable[[], None]) -> GpuMemoryProfile:
    """Run the step once and read the allocator's statistics around it."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device)
    try:
        run_worst_case_step()
        torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError as error:
        raise ConfigError("max_num_batched_tokens", "a worst-case step ran out of GPU memory while profiling; "
                                                    "lower max_num_batched_tokens or max_num_seqs") from error
    peak = torch.cuda.max_memory_allocated(device) - resident
    free, total = torch.cuda.mem_get_info(device)
    non_torch = max(0, total - free - torch.cuda.memory_reserved(device))
    torch.cuda.empty_cache()
    return GpuMemoryProfile(total, resident, peak, non_torch)


@torch.inference_mode()
def run_worst_case_step(model: nn.Module, layers: list[Attention], num_tokens: int, num_sampled_rows: int,
                        block_size: int, dtype: torch.dtype, device: torch.device,
                        forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """The largest step the scheduler can send: one sequence of num_tokens new tokens (the token budget),
    logits and a softmax for num_sampled_rows rows (max_num_seqs requests sampling), on a scratch cache just
    big enough, freed afterwards. The real cache is bound later by init_cache."""
    num_blocks = -(-num_tokens // block_size)
    scratch = allocate_kv_caches(layers, num_blocks, block_size, dtype, device)
    metadata = build_attention_metadata([0], [num_tokens], [list(range(num_blocks))], block_size, device)
    input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    positions = torch.arange(num_tokens, device=device)
    try:
        with forward_context(metadata):
            hidden = forward(input_ids, positions)
        torch.softmax(model.compute_logits(hidden[-min(num_sampled_rows, num_tokens):]), dim=-1)
    finally:
        for layer in layers:  # let the scratch cache go; init_cache binds the real one
            layer.kv_cache = None
            layer.kv_scales = None
        del scratch
