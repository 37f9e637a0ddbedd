"""tokenmill: an LLM inference and serving engine you can read and change.

Names are resolved lazily so that `tokenmill.core` (pure Python) imports without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "tokenmill.llm",
    "SamplingParams": "tokenmill.sampling_params",
    "EngineConfig": "tokenmill.config",
    "CacheConfig": "tokenmill.config",
    "SchedulerConfig": "tokenmill.config",
    "RequestOutput": "tokenmill.outputs",
    "CompletionOutput": "tokenmill.outputs",
    "Logprob": "tokenmill.outputs",
    "TokenmillError": "tokenmill.errors",
    "InvalidRequestError": "tokenmill.errors",
    "ConfigError": "tokenmill.errors",
    "EngineArgs": "tokenmill.engine_args",
    "ModelLoadError": "tokenmill.errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
