"""The one place that asks what hardware we run on, and picks what runs there."""

from __future__ import annotations

import importlib.util

import torch

from tokenmill.attention.base import AttentionBackend
from tokenmill.errors import ConfigError


def cuda_available() -> bool:
    return torch.cuda.is_available()


def triton_available() -> bool:
    return cuda_available() and importlib.util.find_spec("triton") is not None


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


def attention_backend(device: torch.device) -> AttentionBackend:
    """The attention implementation for a device (the torch one until a faster one exists there)."""
    from tokenmill.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()


# Below this size the CPU forward is mostly per-op overhead that compiling trims by ~10% (docs/perf.md), which
# does not repay a compile of ~15 s in most runs; above it, compiled decode measured 1.15-1.4x faster.
COMPILE_MIN_PARAMS_CPU = 50_000_000


def default_compile(device: torch.device, num_params: int) -> bool:
    """Whether the model forward is compiled when the user did not say (EngineConfig.compile is None).

    On the CPU where it measured faster for steady decoding; not yet on GPUs (CUDA graphs come first)."""
    return device.type == "cpu" and num_params >= COMPILE_MIN_PARAMS_CPU
