"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two test processes share the two cores of CI: one intra-op thread each, or they oversubscribe them.
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """For modules that run many small forwards (use with pytest.mark.usefixtures, before other fixtures):
    on a small shared CPU a second intra-op thread mostly waits on the first (often 5-10x slower). Engine
    threads started meanwhile (servers) keep the count they started with."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
