"""`tokenmill bench prefix` on a tiny model: every mode runs, returning conversations hit the tier they
should, the restart finds the disk tier and the cold start does not (correctness, not speed)."""

from __future__ import annotations

import json

import pytest

from tokenmill.cli import main
from tokenmill.tools.tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), max_position_embeddings=512))


def test_prefix_recipe_compares_recompute_host_disk_and_restart(tiny_path, tmp_path, capsys):
    report = tmp_path / "prefix.json"
    code = main(["bench", "prefix", "--model", tiny_path, "--dtype", "float32", "--device", "cpu", "--no-compile",
                 "--system-len", "64", "--history-len", "96", "--conversations", "3", "--output-len", "4",
                 "--kv-disk-path", str(tmp_path / "disk"), "--kv-disk-bytes", "64MiB", "--json", str(report)])
    assert code in (None, 0)
    result = json.loads(report.read_text())["result"]
    assert set(result["median_ttft_s"]) == {"recompute", "host", "disk", "restart_disk", "cold_start"}
    cached = result["cached_tokens"]
    # Turn 1 computed system + history + 3 of its 4 output tokens: its full blocks are what can come back.
    full = (64 + 96 + 3) // 16 * 16
    # The pool holds about one conversation: returning ones find at most the shared system prompt on the device ...
    assert max(cached["recompute"][:2]) <= 64
    # ... and every full block of their turn 1 through the host or the disk tier; after a restart, from disk.
    assert cached["host"] == [full] * 3 and cached["disk"] == [full] * 3
    # The restart finds the previous turns on disk (the shutdown persisted the pool's blocks too).
    next_full = (64 + 96 + 4 + 32) // 16 * 16
    assert cached["restart_disk"] == [next_full] * 3 and cached["cold_start"][0] == 0
    assert set(result["ratios"]) == {"recompute / host", "recompute / disk", "cold start / restart (disk)"}
    printed = capsys.readouterr().out
    assert "ttft host" in printed and "cold start / restart (disk)" in printed
