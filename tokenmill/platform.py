"""The one place that asks what hardware we run on."""

from __future__ import annotations

import importlib.util

import torch

from tokenmill.errors import ConfigError


def cuda_available() -> bool:
    return torch.cuda.is_available()


def triton_available() -> bool:
    return cuda_available() and importlib.util.find_spec("triton") is not None


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU; an explicit 'cuda' without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    if device.startswith("cuda") and not cuda_available():
        raise ConfigError("device", f"{device!r} was asked for, but no CUDA device is available")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ConfigError("device", f"must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return torch.device(device)
