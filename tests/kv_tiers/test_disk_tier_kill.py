"""A process killed (SIGKILL) while it writes disk-tier blocks leaves no readable torn block: after a restart
every block that reads back is exactly what was written, and the rest are absent."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tokenmill.kv_tiers.block_file import TierIdentity
from tokenmill.kv_tiers.disk_tier import DiskTier

IDENTITY = {"model": "/m", "dtype": "float32", "block_size": 4}
BLOCK_BYTES = 1 << 20  # large enough that the kill lands inside a write more often than not

WRITER = """
import sys
from tokenmill.kv_tiers.block_file import TierIdentity
from tokenmill.kv_tiers.disk_tier import DiskTier
tier = DiskTier(sys.argv[1], 1 << 40, TierIdentity({identity!r}))
print("ready", flush=True)
i = 0
while True:
    key = i.to_bytes(16, "big")
    tier.put(key, key * ({size} // 16))
    i += 1
"""


def test_sigkill_mid_write_leaves_only_whole_blocks(tmp_path: Path) -> None:
    script = WRITER.format(identity=IDENTITY, size=BLOCK_BYTES)
    writer = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 20
    while len(list(tmp_path.rglob("*"))) < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=10)
    restarted = DiskTier(tmp_path, 1 << 40, TierIdentity(IDENTITY))
    keys = restarted.keys()
    assert len(keys) >= 2  # the writer got going before it was killed
    for key in keys:
        block = restarted.read(key)
        assert block is not None and bytes(block) == key * (BLOCK_BYTES // 16)
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    assert leftovers == []  # a half-written temporary file is cleaned up at start
