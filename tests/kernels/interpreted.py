"""Run a script under the Triton interpreter in a fresh process.

TRITON_INTERPRET=1 must be set before Triton is first imported, and the test process may already have
imported it (the sm_90 compile checks do), so interpreted runs get a process of their own. The script prints
one JSON document as its last line of output; that is what comes back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def run_interpreted(script: Path, *args: str, timeout: float = 600) -> Any:
    """The JSON document the script prints last."""
    return json.loads(run_script_interpreted(script, *args, timeout=timeout).strip().splitlines()[-1])


def run_script_interpreted(script: Path, *args: str, timeout: float = 600) -> str:
    """The script's standard output; a non-zero exit fails with its standard error."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{script.name} {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout
