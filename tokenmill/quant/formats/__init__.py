"""Quantized checkpoint formats other people write, converted to tokenmill's canonical weight (quant/codes.py).

One file per format (gptq, awq, compressed_tensors, and tokenmill's own, already canonical), each a
`CheckpointFormat` read from config.json's `quantization_config`; GGUF blocks are repacked by
models/gguf/canonical.py, next to the GGUF reader.
"""

from __future__ import annotations

from tokenmill.errors import ConfigError
from tokenmill.quant.formats.awq import AWQFormat
from tokenmill.quant.formats.base import CanonicalWeight, CheckpointFormat
from tokenmill.quant.formats.compressed_tensors import CompressedTensorsFormat
from tokenmill.quant.formats.gptq import GPTQFormat
from tokenmill.quant.formats.tokenmill_format import TokenmillFormat

FORMATS: dict[str, type[CheckpointFormat]] = {
    "tokenmill": TokenmillFormat, "gptq": GPTQFormat, "awq": AWQFormat, "compressed-tensors": CompressedTensorsFormat,
}

__all__ = ["FORMATS", "CanonicalWeight", "CheckpointFormat", "checkpoint_format"]


def checkpoint_format(entry: dict) -> CheckpointFormat | None:
    """The format a `quantization_config` entry describes; None for a GGUF file's entry (its tensors are
    converted as the file is read, models/gguf/); ConfigError for a method nobody reads."""
    method = entry.get("quant_method")
    if method == "gguf":
        return None
    if method not in FORMATS:
        known = ", ".join(FORMATS)
        raise ConfigError("quantization_config.quant_method", f"{method!r} is not supported (supported: {known})")
    return FORMATS[method](entry)
