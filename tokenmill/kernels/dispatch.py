"""Whether the layers' kernels run as Triton kernels: the one check the layers (norm, rotary, activation) and
`tokenmill.platform` share, so "is Triton there" has one answer."""

from __future__ import annotations

import functools
import importlib.util

import torch


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton_kernels(x: torch.Tensor) -> bool:
    """For a CUDA tensor with Triton installed, outside torch.compile: a compiled graph gets inductor's own
    fused kernels for these ops, and eager CUDA gets ours; CPU tensors keep the torch twins."""
    return x.is_cuda and triton_installed() and not torch.compiler.is_compiling()
