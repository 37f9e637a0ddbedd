"""A tiny progress bar on stderr (no tqdm dependency)."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    def __init__(self, total: int, label: str, enabled: bool = True, width: int = 30) -> None:
        self.total = max(total, 1)
        self.label = label
        self.enabled = enabled and total > 0
        self.width = width
        self.count = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._drawn_count = -1

    def update(self, n: int = 1) -> None:
        self.count += n
        now = time.perf_counter()
        if self.enabled and (now - self._last_draw > 0.1 or self.count >= self.total):
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        self._drawn_count = self.count
        filled = int(self.width * self.count / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        sys.stderr.write(f"\r{self.label} [{bar}] {self.count}/{self.total} {now - self.start:.1f}s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            if self._drawn_count != self.count:
                self._draw(time.perf_counter())
            sys.stderr.write("\n")
            sys.stderr.flush()
