"""GGUF checkpoints: one file holding the architecture, the weights, the tokenizer and the chat template.

`reader` parses the container (no `gguf` package needed), `config` turns its metadata into the HF-style
config dict that `parse_arch_config` reads, `weights` maps its tensors onto tokenmill's parameters,
`dequant` turns quantized blocks into the engine dtype, and `tokenizer` rebuilds a `tokenizers.Tokenizer`.
"""

from __future__ import annotations

from pathlib import Path

GGUF_MAGIC = b"GGUF"


def is_gguf_path(model_path: str | Path) -> bool:
    """A file named *.gguf, or any file that starts with the GGUF magic: the model path names one file."""
    path = Path(model_path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False
