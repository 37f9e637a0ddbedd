"""Calibration windows: the requested count and length, deterministic, and never from the held-out texts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenmill.errors import ConfigError
from tokenmill.quant.calibration import (HELDOUT_CODE, _docstrings, HELDOUT_ENGLISH, calibration_windows,
                                         default_calibration_modules, heldout_code_text, heldout_english_text,
                                         stdlib_root)


def encode(text: str) -> list[int]:
    return [ord(c) % 512 for c in text]  # one id per character: enough to cut windows


def test_default_windows_are_half_english_half_code_and_repeatable() -> None:
    windows = calibration_windows(encode, num_samples=10, window=64)
    assert len(windows) == 10 and all(len(w) == 64 for w in windows)
    assert windows == calibration_windows(encode, num_samples=10, window=64)
    english, code = "".join(map(chr, windows[0])), "".join(map(chr, windows[-1]))
    sources = [p.read_text(encoding="utf-8", errors="replace") for p in default_calibration_modules()[:5]]
    assert _docstrings(sources[0]).startswith(english)  # the first module's docstrings, in the fixed order
    assert any(code in source for source in sources)  # the code windows: module source as it is


def test_default_calibration_never_reads_the_held_out_files() -> None:
    modules = set(default_calibration_modules())
    root = stdlib_root()
    assert not modules & {root / name for name in HELDOUT_CODE} and root / HELDOUT_ENGLISH not in modules
    assert len(modules) > 50
    assert "Identifiers (also referred to as *names*)" in heldout_english_text()
    assert "class ArgumentParser" in heldout_code_text()


def test_windows_from_files(tmp_path: Path) -> None:
    text = tmp_path / "a.txt"
    text.write_text("x" * 1000)
    windows = calibration_windows(encode, num_samples=100, window=100, files=[text])
    assert len(windows) == 10  # the text runs out: as many whole windows as it holds


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_samples": 0}, "samples: must be at least 1"),
    ({"window": 1}, "calibration window: must be at least 2"),
    ({"files": ["/nonexistent/file.txt"]}, "calibration: /nonexistent/file.txt: no such file"),
])
def test_bad_calibration_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        calibration_windows(encode, **kwargs)


def test_text_shorter_than_a_window_is_refused(tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(ConfigError, match="shorter than one window of 128 tokens"):
        calibration_windows(encode, files=[short])
