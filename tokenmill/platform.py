"""The one place that asks what hardware we run on, and picks what runs there."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from tokenmill.attention.base import AttentionBackend
from tokenmill.errors import ConfigError
from tokenmill.kernels.dispatch import triton_installed


def cuda_available() -> bool:
    return torch.cuda.is_available()


def triton_available() -> bool:
    return cuda_available() and triton_installed()


def triton_interpreted() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on the CPU through its interpreter (slow; for tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def supports_float8_storage(device: torch.device) -> bool:
    """Whether torch can hold float8_e4m3fn tensors on the device and convert to and from them (what an fp8 KV
    cache needs; no fp8 matmul is involved). Asked by converting one value there."""
    if not hasattr(torch, "float8_e4m3fn"):
        return False
    try:
        return bool(torch.ones(1, device=device).to(torch.float8_e4m3fn).float().item() == 1.0)
    except (RuntimeError, TypeError):  # no float8 kernels for this device in this build
        return False


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU; an explicit 'cuda' without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    if device.startswith("cuda") and not cuda_available():
        raise ConfigError("device", f"{device!r} was asked for, but no CUDA device is available")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ConfigError("device", f"must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return torch.device(device)


def resolve_attention_backend(choice: str, device: torch.device, quantized_kv: bool = False) -> str:
    """'torch' or 'triton' for EngineConfig.attention_backend on this device. 'auto' takes triton on CUDA when it
    is installed; an explicit 'triton' needs the package, and a CUDA device or the Triton interpreter.
    `quantized_kv` (an int8/fp8 KV cache) keeps attention on torch: only its backend reads such a cache."""
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_installed() and not quantized_kv else "torch"
    if choice == "triton":
        if quantized_kv:
            raise ConfigError("kv_cache_dtype", "a quantized KV cache is read by the torch attention backend only, "
                                                "not by attention_backend='triton'; use 'auto' for either setting")
        if not triton_installed():
            raise ConfigError("attention_backend", "'triton' needs the triton package, which is not installed")
        if device.type != "cuda" and not triton_interpreted():
            raise ConfigError("attention_backend", f"'triton' runs on CUDA devices, not {device.type}; on the CPU "
                                                   "only under the Triton interpreter (TRITON_INTERPRET=1, for tests)")
        return choice
    if choice != "torch":
        raise ConfigError("attention_backend", f"must be 'auto', 'torch' or 'triton', got {choice!r}")
    return choice


def attention_backend(device: torch.device, choice: str = "auto", quantized_kv: bool = False) -> AttentionBackend:
    """The attention implementation for a device (resolve_attention_backend picks which)."""
    if resolve_attention_backend(choice, device, quantized_kv) == "triton":
        from tokenmill.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    from tokenmill.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()


# Below this size the CPU forward is mostly per-op overhead that compiling trims by ~10% (docs/perf.md), which
# does not repay a compile of ~15 s in most runs; above it, compiled decode measured 1.15-1.4x faster.
COMPILE_MIN_PARAMS_CPU = 50_000_000


def default_compile(device: torch.device, num_params: int) -> bool:
    """Whether the model forward is compiled when the user did not say (EngineConfig.compile is None).

    On the CPU where it measured faster for steady decoding; not yet on GPUs (CUDA graphs come first)."""
    return device.type == "cpu" and num_params >= COMPILE_MIN_PARAMS_CPU


def default_async_scheduling(device: torch.device) -> bool:
    """Whether the engine plans step n+1 while step n runs when the user did not say: on GPUs, where the host's
    work would otherwise leave the device idle between steps. On the CPU the host work and the model share
    the cores: on two shared cores it measured 0.94x at batch 1 and a noisy 1.55x at batch 32 (docs/gpu.md)."""
    return device.type == "cuda"


def fp8_matmul_available(device: torch.device) -> bool:
    """Whether `device` multiplies fp8 matrices in hardware (torch._scaled_mm): CUDA compute capability 8.9+."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def cpu_bf16_prepack_available() -> bool:
    """Whether oneDNN can reorder bfloat16 linear weights into its blocked layout on this CPU: it needs AVX-512
    (bw/vl/dq) or AVX-NE-CONVERT, and refuses with an error on an AVX2-only machine."""
    return torch.backends.mkldnn.is_available() and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


@functools.cache
def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX): there a bfloat16 GEMM runs at
    twice float32's rate, elsewhere oneDNN emulates it several times slower (read from Linux's CPU flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return torch.backends.mkldnn.is_available() and ("avx512_bf16" in flags or "amx_bf16" in flags)
