"""KV pool sizing: bytes per block, the fixed budget, the profile's arithmetic and the errors naming a setting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenmill.config import CacheConfig
from tokenmill.errors import ConfigError
from tokenmill.layers.attention import Attention
from tokenmill.worker.kv_cache_alloc import bytes_per_block
from tokenmill.worker.memory_sizing import (
    GpuMemoryProfile,
    budget_from_profile,
    kv_cache_budget,
    run_worst_case_step,
)

GIB = 1 << 30
CUDA = torch.device("cuda")  # a device object only: nothing here touches a GPU


def test_bytes_per_block_is_keys_and_values_of_every_layer() -> None:
    layers = [Attention(32, 8, 128, 1.0) for _ in range(32)] + [Attention(4, 1, 64, 1.0)]  # an odd last layer
    per_token = 32 * 2 * 8 * 128 + 2 * 1 * 64  # layers x (K and V) x kv heads x head dim
    assert bytes_per_block(layers, 16, torch.bfloat16) == 16 * per_token * 2
    assert bytes_per_block(layers, 32, torch.float32) == 32 * per_token * 4


def _never_measured() -> GpuMemoryProfile:
    raise AssertionError("a fixed budget must not profile the GPU")


def test_a_fixed_budget_wins_on_every_device_without_profiling() -> None:
    cache = CacheConfig(kv_cache_memory=3 * GIB, kv_cache_memory_bytes=5 * GIB)
    assert kv_cache_budget(cache, torch.device("cpu"), _never_measured, 2048) == 3 * GIB
    assert kv_cache_budget(cache, CUDA, _never_measured, 2048) == 3 * GIB


def test_the_cpu_uses_its_default_budget_and_the_gpu_profiles() -> None:
    assert kv_cache_budget(CacheConfig(kv_cache_memory_bytes=5 * GIB), torch.device("cpu"), _never_measured,
                           2048) == 5 * GIB
    profile = GpuMemoryProfile(total_bytes=100 * GIB, resident_bytes=16 * GIB, step_peak_bytes=3 * GIB,
                               non_torch_bytes=1 * GIB)
    budget = kv_cache_budget(CacheConfig(gpu_memory_utilization=0.5), CUDA, lambda: profile, 2048)
    assert budget == 50 * GIB - 16 * GIB - 3 * GIB - 1 * GIB


def test_a_model_that_does_not_fit_names_gpu_memory_utilization_or_the_model() -> None:
    profile = GpuMemoryProfile(total_bytes=80 * GIB, resident_bytes=70 * GIB, step_peak_bytes=GIB,
                               non_torch_bytes=GIB)
    with pytest.raises(ConfigError, match=r"take 71.00 GiB, more than gpu_memory_utilization=0.8 of the GPU's "
                                          r"80.00 GiB \(64.00 GiB\); raise gpu_memory_utilization") as info:
        budget_from_profile(profile, 0.8, 2048)
    assert info.value.setting == "gpu_memory_utilization"
    huge = GpuMemoryProfile(total_bytes=80 * GIB, resident_bytes=90 * GIB, step_peak_bytes=0, non_torch_bytes=0)
    with pytest.raises(ConfigError, match="more than the GPU's 80.00 GiB; use a smaller dtype or model") as info:
        budget_from_profile(huge, 1.0, 2048)
    assert info.value.setting == "model"


def test_a_step_that_leaves_no_kv_memory_names_max_num_batched_tokens() -> None:
    profile = GpuMemoryProfile(total_bytes=80 * GIB, resident_bytes=60 * GIB, step_peak_bytes=12 * GIB,
                               non_torch_bytes=GIB)
    with pytest.raises(ConfigError, match="a step of 65536 tokens needs 12.00 GiB beyond the model's 61.00 GiB, "
                                          "leaving no KV memory .*; lower max_num_batched_tokens") as info:
        budget_from_profile(profile, 0.9, 65536)
    assert info.value.setting == "max_num_batched_tokens"
    assert budget_from_profile(profile, 1.0, 65536) == 80 * GIB - 73 * GIB  # all of it: 7 GiB are left


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.checkpoints import make_checkpoint

    return make_checkpoint("llama", tmp_path_factory.mktemp("sizing"))


def test_kv_cache_memory_sizes_the_cpu_pool(tiny_model: Path) -> None:
    from tokenmill.llm import LLM

    llm = LLM(str(tiny_model), dtype="float32", kv_cache_memory="1MiB", kv_cache_memory_gb=0.5)
    per_block = 2 * 2 * 16 * 2 * 24 * 4  # layers x (K, V) x block x kv heads x head dim x float32
    assert llm.engine.kv_manager.pool.num_blocks == (1 << 20) // per_block == 85


def test_the_worst_case_step_runs_on_a_scratch_cache_and_lets_it_go(tiny_model: Path) -> None:
    from tokenmill.models.loader import load_model

    model, _ = load_model(tiny_model, dtype="float32")
    layers = model.attention_layers()
    run_worst_case_step(model, layers, num_tokens=40, num_sampled_rows=8, block_size=16, dtype=torch.float32,
                        device=torch.device("cpu"), forward=model.forward)
    assert all(layer.kv_cache is None for layer in layers)
