"""The whole engine with attention_backend="triton", its kernels run by the Triton interpreter, gives the same
greedy tokens as the torch backend in float32: batching (also planned a step ahead), chunked prefill, prefix hits and speculative
verification; Llama (GQA, head_dim 24) and Gemma 2 (soft-capped scores, a 32-token sliding window). Also with
the layers' own kernels (norm, rotary, activation) switched on as they are on CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kernels.interpreted import run_interpreted

pytest.importorskip("triton")  # tests extra: the kernels need it, even interpreted

FAMILIES = ("llama", "gemma2")
# With the layers' kernels on as well: Llama-3 RoPE scaling, q/k norms (Qwen3), Gemma's offset norm and GeGLU
# with q/k norms (Gemma 3), partial rotary on a fused qkv (Phi-3).
LAYER_FAMILIES = ("llama3", "qwen3", "gemma3", "phi3")
SCENARIOS = ("batched", "async_scheduling", "chunked", "prefix_hit", "speculative")


@pytest.fixture(scope="module")
def runs() -> dict[str, dict[str, dict]]:
    return run_interpreted(Path(__file__).with_name("engine_parity_script.py"), *FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_backend_was_the_one_running(family: str, runs) -> None:
    assert runs[family]["torch"]["backend"] == "torch"
    assert runs[family]["triton"]["backend"] == "triton"


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("family", FAMILIES)
def test_same_greedy_tokens_as_the_torch_backend(family: str, scenario: str, runs) -> None:
    assert runs[family]["triton"][scenario] == runs[family]["torch"][scenario]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_scenarios_did_what_they_claim(family: str, runs) -> None:
    triton = runs[family]["triton"]
    assert triton["prefix_cached_tokens"] >= 16  # the second pass read a cached block
    assert triton["spec_accepted"] > 0  # drafts were verified (several queries per sequence) and accepted
    assert triton["async_scheduling"] == triton["batched"]  # planning ahead changes no token


@pytest.fixture(scope="module")
def layer_runs() -> dict[str, dict]:
    return run_interpreted(Path(__file__).with_name("layer_kernels_script.py"), *LAYER_FAMILIES)


@pytest.mark.parametrize("family", LAYER_FAMILIES)
def test_layer_kernels_and_triton_attention_give_the_torch_tokens(family: str, layer_runs) -> None:
    run = layer_runs[family]
    assert run["layer_calls"] > 0  # the layers did ask for their Triton kernels
    assert run["triton"] == run["torch"]
