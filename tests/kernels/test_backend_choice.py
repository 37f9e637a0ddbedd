"""Who picks the attention backend (tokenmill.platform), and the errors for a choice that cannot run."""

from __future__ import annotations

import argparse

import pytest
import torch

from tokenmill import LLM
from tokenmill.config import EngineConfig
from tokenmill.engine_args import EngineArgs
from tokenmill.errors import ConfigError
from tokenmill.platform import attention_backend, resolve_attention_backend

CPU = torch.device("cpu")


@pytest.fixture
def not_interpreted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.usefixtures("not_interpreted")
def test_auto_takes_torch_on_the_cpu() -> None:
    assert resolve_attention_backend("auto", CPU) == "torch"
    assert attention_backend(CPU).name == "torch"


@pytest.mark.usefixtures("not_interpreted")
def test_triton_on_the_cpu_without_the_interpreter_names_the_setting() -> None:
    with pytest.raises(ConfigError) as error:
        resolve_attention_backend("triton", CPU)
    assert error.value.setting == "attention_backend"
    assert "TRITON_INTERPRET=1" in str(error.value)


def test_triton_on_the_cpu_under_the_interpreter_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_attention_backend("triton", CPU) == "triton"


def test_auto_takes_triton_on_cuda_when_it_is_installed() -> None:
    pytest.importorskip("triton")
    assert resolve_attention_backend("auto", torch.device("cuda")) == "triton"


def test_an_unknown_backend_names_the_setting_and_the_choices() -> None:
    with pytest.raises(ConfigError) as error:
        EngineConfig(model="m", attention_backend="flash")
    assert error.value.setting == "attention_backend"
    assert "auto, torch, triton" in str(error.value)


def test_the_flag_reaches_the_engine_config() -> None:
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = parser.parse_args(["--attention-backend", "torch"])
    assert EngineArgs.from_cli_args(args).attention_backend == "torch"
    assert parser.parse_args([]).attention_backend == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--attention-backend", "flash"])


@pytest.mark.usefixtures("not_interpreted")
def test_llm_refuses_triton_on_the_cpu_before_loading_anything(tmp_path) -> None:
    # The folder holds no checkpoint: the backend is judged before the model is read.
    with pytest.raises(ConfigError) as error:
        LLM(model=str(tmp_path), device="cpu", attention_backend="triton")
    assert error.value.setting == "attention_backend"


def test_triton_backend_refuses_a_quantized_kv_cache_naming_the_setting() -> None:
    pytest.importorskip("triton")
    from tokenmill.attention.metadata import build_attention_metadata
    from tokenmill.attention.triton_backend import TritonAttentionBackend

    backend = TritonAttentionBackend()
    cache = torch.zeros(backend.kv_cache_shape(4, 16, 2, 16), dtype=torch.int8)
    metadata = build_attention_metadata([0], [3], [[1]], 16, CPU)
    query, key = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
    with pytest.raises(ConfigError) as error:
        backend.forward(query, key, key, cache, metadata, 0.25, None)
    assert error.value.setting == "kv_cache_dtype"
    assert "attention_backend='torch'" in str(error.value)


def test_a_quantized_kv_cache_keeps_auto_on_torch_and_refuses_triton() -> None:
    pytest.importorskip("triton")
    assert resolve_attention_backend("auto", torch.device("cuda"), quantized_kv=True) == "torch"
    with pytest.raises(ConfigError) as error:
        resolve_attention_backend("triton", torch.device("cuda"), quantized_kv=True)
    assert error.value.setting == "kv_cache_dtype"


def test_triton_backend_refuses_kv_scales() -> None:
    pytest.importorskip("triton")
    from tokenmill.attention.metadata import build_attention_metadata
    from tokenmill.attention.triton_backend import TritonAttentionBackend

    backend = TritonAttentionBackend()
    cache = torch.zeros(backend.kv_cache_shape(4, 16, 2, 16))
    metadata = build_attention_metadata([0], [3], [[1]], 16, CPU)
    query, key = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        backend.forward(query, key, key, cache, metadata, 0.25, None, kv_scales=torch.ones(2, 4, 16, 2))
