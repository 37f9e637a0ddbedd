"""The quantization a checkpoint carries, read from its config dict: the one lookup model building uses.

A small dispatch on `quantization_config.quant_method`: a GGUF file's config dict (models/gguf/config.py)
states the spec its block types map onto; tokenmill's own, GPTQ, AWQ and compressed-tensors configs are read
by their formats (quant/formats/).
"""

from __future__ import annotations

from typing import Any

from tokenmill.errors import ConfigError
from tokenmill.quant.codes import QuantSpec
from tokenmill.quant.formats import checkpoint_format


def checkpoint_quant_spec(config: dict[str, Any]) -> QuantSpec | None:
    """The QuantSpec of the checkpoint whose config.json (or GGUF metadata) is `config`; None if unquantized."""
    entry = config.get("quantization_config")
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise ConfigError("quantization_config", f"expected an object, got {type(entry).__name__}")
    if entry.get("quant_method") == "gguf":
        return QuantSpec(str(entry.get("method")), entry.get("group_size"), bool(entry.get("zero_point", False)))
    found = checkpoint_format(entry)
    assert found is not None  # only GGUF's entry has no format, handled above
    return found.spec
