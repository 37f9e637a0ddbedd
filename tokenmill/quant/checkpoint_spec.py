"""Which quantization a checkpoint's weights are stored in, from its config: the one lookup every checkpoint
format goes through. Each format that stores quantized weights adds a reader to `_READERS`, keyed by the
`quant_method` its `quantization_config` names; a checkpoint without that entry is a float checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tokenmill.errors import ConfigError
from tokenmill.quant.codes import QuantSpec

_READERS: dict[str, Callable[[dict[str, Any]], QuantSpec]] = {
    "tokenmill": QuantSpec.from_config,
}


def checkpoint_quant_spec(config: dict[str, Any]) -> QuantSpec | None:
    """The QuantSpec of a checkpoint's weights (config.json as a dict), or None for float weights."""
    entry = config.get("quantization_config")
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise ConfigError("quantization_config", f"must be an object, got {type(entry).__name__}")
    method = entry.get("quant_method")
    reader = _READERS.get(str(method))
    if reader is None:
        raise ConfigError("quantization_config.quant_method",
                          f"{method!r} checkpoints are not supported (supported: {', '.join(sorted(_READERS))})")
    return reader(entry)
