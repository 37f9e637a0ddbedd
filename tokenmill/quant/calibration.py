"""Calibration data: token windows of the model's own tokenizer, from the user's text files or, by default, from
English and Python shipped with Python that the accuracy benchmark does NOT evaluate on.

Held out (never calibrated on): the English of `pydoc_data/topics.py` and the Python code of HELDOUT_CODE.
Default calibration: half the windows from docstrings (English prose) of the other top-level standard-library
modules, half from their source code, the modules taken in a fixed shuffled order.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from tokenmill.errors import ConfigError

Encode = Callable[[str], list[int]]

HELDOUT_ENGLISH = "pydoc_data/topics.py"
HELDOUT_CODE = ("argparse.py", "textwrap.py", "fractions.py", "heapq.py", "statistics.py",
                "json/encoder.py", "json/decoder.py")
# 64 windows x 128 tokens: 8k tokens, five times the widest input of a small model (SmolLM2's 1536). The cost of
# GPTQ and AWQ is mostly these tokens going through every layer twice (inputs, then the quantized layer's outputs)
# and GPTQ's X X^T: 16k tokens took SmolLM2-135M past 5 minutes on 2 busy cores.
DEFAULT_SAMPLES = 64
DEFAULT_WINDOW = 128
_SHUFFLE_SEED = 0


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def heldout_english_text() -> str:
    """The pydoc topic texts (the values of the `topics` dict), joined: English prose about Python."""
    source = (stdlib_root() / HELDOUT_ENGLISH).read_text(encoding="utf-8")
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            texts = [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
            return "\n\n".join(texts)
    raise ValueError(f"{HELDOUT_ENGLISH}: no topics dict found")


def heldout_code_text() -> str:
    return "\n\n".join((stdlib_root() / name).read_text(encoding="utf-8") for name in HELDOUT_CODE)


def _docstrings(source: str) -> str:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ""
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 80:  # one-liners are mostly names, not prose
                docs.append(doc)
    return "\n\n".join(docs)


def default_calibration_modules() -> list[Path]:
    """Top-level stdlib modules other than the held-out ones, in a fixed shuffled order."""
    root = stdlib_root()
    held_out = {root / name for name in HELDOUT_CODE} | {root / HELDOUT_ENGLISH}
    modules = sorted(p for p in root.glob("*.py") if p not in held_out and not p.name.startswith("_"))
    random.Random(_SHUFFLE_SEED).shuffle(modules)
    return modules


def _default_texts(kind: str) -> Iterator[str]:
    for path in default_calibration_modules():
        source = path.read_text(encoding="utf-8", errors="replace")
        yield _docstrings(source) if kind == "english" else source


def _windows(texts: Iterator[str], encode: Encode, count: int, window: int) -> list[list[int]]:
    """Consecutive non-overlapping windows of `window` tokens, up to `count`, reading texts as needed."""
    out: list[list[int]] = []
    pending: list[int] = []
    for text in texts:
        if not text:
            continue
        pending.extend(encode(text))
        while len(pending) >= window and len(out) < count:
            out.append(pending[:window])
            pending = pending[window:]
        if len(out) >= count:
            break
    return out


def calibration_windows(encode: Encode, num_samples: int = DEFAULT_SAMPLES, window: int = DEFAULT_WINDOW,
                        files: Sequence[str | Path] | None = None) -> list[list[int]]:
    """`num_samples` token windows of length `window` for calibration (fewer if the text runs out)."""
    if num_samples < 1:
        raise ConfigError("samples", f"must be at least 1, got {num_samples}")
    if window < 2:
        raise ConfigError("calibration window", f"must be at least 2 tokens, got {window}")
    if files:
        texts: list[str] = []
        for name in files:
            path = Path(name)
            if not path.is_file():
                raise ConfigError("calibration", f"{name}: no such file")
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
        windows = _windows(iter(texts), encode, num_samples, window)
    else:
        english = _windows(_default_texts("english"), encode, (num_samples + 1) // 2, window)
        windows = english + _windows(_default_texts("code"), encode, num_samples - len(english), window)
    if not windows:
        raise ConfigError("calibration", f"the calibration text is shorter than one window of {window} tokens")
    return windows
