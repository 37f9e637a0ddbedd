"""The GPU memory profile (skipped without a GPU): the pool fits the share it was given, and a share too small
for the model is a ConfigError naming gpu_memory_utilization."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenmill.errors import ConfigError

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.checkpoints import make_checkpoint

    return make_checkpoint("llama", tmp_path_factory.mktemp("gpu-sizing"))


def test_the_profiled_pool_stays_within_the_share(tiny_model: Path) -> None:
    from tokenmill.llm import LLM

    total = torch.cuda.mem_get_info()[1]
    llm = LLM(str(tiny_model), device="cuda", dtype="float32", gpu_memory_utilization=0.05, max_model_len=256,
              enforce_eager=True)
    per_block = 2 * 2 * 16 * 2 * 24 * 4  # layers x (K, V) x block x kv heads x head dim x float32
    pool_bytes = llm.engine.kv_manager.pool.num_blocks * per_block
    assert 0.25 * 0.05 * total < pool_bytes <= 0.05 * total  # a tiny model leaves much of the share to KV
    assert torch.cuda.memory_allocated() <= 0.05 * total


def test_a_share_too_small_for_the_model_names_gpu_memory_utilization(tiny_model: Path) -> None:
    from tokenmill.llm import LLM

    with pytest.raises(ConfigError, match="raise gpu_memory_utilization") as info:
        LLM(str(tiny_model), device="cuda", dtype="float32", gpu_memory_utilization=1e-6, max_model_len=256)
    assert info.value.setting == "gpu_memory_utilization"
