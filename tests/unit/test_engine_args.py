"""EngineArgs: every knob reaches the engine from each command line and from LLM(**kwargs); bad ones raise
ConfigError naming the setting. No model is loaded: a stand-in LLMEngine captures the config it is given."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import pytest

from tokenmill.cli import build_parser, main
from tokenmill.config import EngineConfig
from tokenmill.engine_args import EngineArgs
from tokenmill.errors import ConfigError, InvalidRequestError
from tokenmill.llm import LLM


@dataclass(frozen=True)
class Case:
    argv: list[str]  # flags that set a non-default value
    value: Any  # that value, as the EngineArgs field (and the LLM keyword) holds it
    read: Callable[[EngineConfig], Any]  # where the EngineConfig carries it
    expected: Any  # what the EngineConfig must carry


def _case(argv: list[str], value: Any, read: Callable[[EngineConfig], Any], expected: Any = None) -> Case:
    return Case(argv, value, read, value if expected is None else expected)


CASES: dict[str, Case] = {
    "model": _case(["--model", "/ckpt/target"], "/ckpt/target", lambda c: c.model),
    "dtype": _case(["--dtype", "bfloat16"], "bfloat16", lambda c: c.dtype),
    "device": _case(["--device", "cuda:1"], "cuda:1", lambda c: c.device),
    "load_format": _case(["--load-format", "random"], "random", lambda c: c.load_format),
    "max_model_len": _case(["--max-model-len", "777"], 777, lambda c: c.max_model_len),
    "seed": _case(["--seed", "123"], 123, lambda c: c.seed),
    "compile": _case(["--compile"], True, lambda c: c.compile),
    "quantization": _case(["--quantization", "int4:g32"], "int4:g32", lambda c: c.quantization),
    "attention_backend": _case(["--attention-backend", "torch"], "torch", lambda c: c.attention_backend),
    "enforce_eager": _case(["--enforce-eager"], True, lambda c: c.enforce_eager),
    "async_scheduling": _case(["--async-scheduling"], True, lambda c: c.async_scheduling),
    "kv_cache_memory": _case(["--kv-cache-memory", "500MB"], "500MB", lambda c: c.cache.kv_cache_memory,
                             500_000_000),
    "gpu_memory_utilization": _case(["--gpu-memory-utilization", "0.5"], 0.5,
                                    lambda c: c.cache.gpu_memory_utilization),
    "block_size": _case(["--block-size", "32"], 32, lambda c: c.cache.block_size),
    "num_kv_blocks": _case(["--num-kv-blocks", "999"], 999, lambda c: c.cache.num_kv_blocks),
    "kv_cache_memory_gb": _case(["--kv-cache-memory-gb", "0.75"], 0.75, lambda c: c.cache.kv_cache_memory_bytes,
                                805_306_368),
    "enable_prefix_caching": _case(["--no-prefix-caching"], False, lambda c: c.cache.enable_prefix_caching),
    "kv_cache_dtype": _case(["--kv-cache-dtype", "int8"], "int8", lambda c: c.cache.kv_cache_dtype),
    "kv_host_bytes": _case(["--kv-host-bytes", "3GiB"], "3GiB", lambda c: c.cache.kv_host_bytes, 3 << 30),
    # The disk tier needs both; the bytes case comes last, so its value wins when all flags are given.
    "kv_disk_path": _case(["--kv-disk-path", "/tmp/kvd", "--kv-disk-bytes", "1GiB"], "/tmp/kvd",
                          lambda c: c.cache.kv_disk_path),
    "kv_disk_bytes": _case(["--kv-disk-path", "/tmp/kvd", "--kv-disk-bytes", "2GiB"], "2GiB",
                           lambda c: c.cache.kv_disk_bytes, 2 << 30),
    "max_num_seqs": _case(["--max-num-seqs", "7"], 7, lambda c: c.scheduler.max_num_seqs),
    "max_num_batched_tokens": _case(["--max-num-batched-tokens", "333"], 333,
                                    lambda c: c.scheduler.max_num_batched_tokens),
    "speculative_method": _case(["--speculative-method", "ngram"], "ngram", lambda c: c.spec.method),
    "num_speculative_tokens": _case(["--num-speculative-tokens", "9"], 9, lambda c: c.spec.num_speculative_tokens),
    "draft_model": _case(["--draft-model", "/ckpt/draft"], "/ckpt/draft", lambda c: c.spec.draft_model),
    "draft_dtype": _case(["--draft-dtype", "float16"], "float16", lambda c: c.spec.draft_dtype),
    "ngram_min": _case(["--ngram-min", "2"], 2, lambda c: c.spec.ngram_min),
    "ngram_max": _case(["--ngram-max", "6"], 6, lambda c: c.spec.ngram_max),
    "speculative_adaptive": _case(["--no-speculative-adaptive"], False, lambda c: c.spec.adaptive),
    "draft_confidence_threshold": _case(["--draft-confidence-threshold", "0.35"], 0.35,
                                        lambda c: c.spec.draft_confidence_threshold),
    "reasoning_start": _case(["--reasoning-start", "[T]"], "[T]", lambda c: c.thinking.start),
    "reasoning_end": _case(["--reasoning-end", "[/T]"], "[/T]", lambda c: c.thinking.end),
    "thinking_wrap_up": _case(["--thinking-wrap-up", "\nTime is up.\n"], "\nTime is up.\n",
                              lambda c: c.thinking.wrap_up),
    "enable_lora": _case(["--enable-lora"], True, lambda c: c.lora is not None),
    "lora_modules": _case(["--enable-lora", "--lora-modules", "a=/ad/a", "b=/ad/b"], ["a=/ad/a", "b=/ad/b"],
                          lambda c: c.lora.modules, (("a", "/ad/a"), ("b", "/ad/b"))),
    "max_loras": _case(["--enable-lora", "--max-loras", "3"], 3, lambda c: c.lora.max_loras),
    "max_lora_rank": _case(["--enable-lora", "--max-lora-rank", "64"], 64, lambda c: c.lora.max_lora_rank),
}

# The arguments each command needs besides the engine flags.
COMMANDS = {"generate": ["generate", "--prompt", "x"], "chat": ["chat"], "serve": ["serve"],
            "bench": ["bench", "latency"]}
TARGET = ["--model", "/ckpt/target"]  # so that no test depends on the default model being present


class Captured(Exception):
    def __init__(self, config: EngineConfig, kwargs: dict[str, Any]) -> None:
        super().__init__("engine construction captured")
        self.config = config
        self.kwargs = kwargs


def _capturing_engine(config: EngineConfig, **kwargs: Any) -> None:
    raise Captured(config, kwargs)


@pytest.fixture
def engine_config_of(monkeypatch: pytest.MonkeyPatch) -> Callable[[list[str]], EngineConfig]:
    """Run the command line as a user would, and return the EngineConfig its engine was built with."""
    monkeypatch.setattr("tokenmill.llm.LLMEngine", _capturing_engine)
    monkeypatch.setattr("tokenmill.engine.engine.LLMEngine", _capturing_engine)

    def run(argv: list[str]) -> EngineConfig:
        with pytest.raises(Captured) as info:
            main(argv)
        return info.value.config

    return run


def test_every_field_has_a_case_with_a_non_default_value() -> None:
    assert set(CASES) == {knob.name for knob in fields(EngineArgs)}
    defaults = EngineArgs()
    cli_defaults = EngineArgs.from_cli_args(build_parser().parse_args(["chat"]))
    for name, case in CASES.items():
        assert case.value != getattr(defaults, name), name
        assert case.value != getattr(cli_defaults, name), name


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("name", list(CASES))
def test_each_flag_reaches_the_engine(command: str, name: str, engine_config_of) -> None:
    case = CASES[name]
    model = [] if name == "model" else TARGET
    config = engine_config_of(COMMANDS[command] + model + case.argv)
    assert case.read(config) == case.expected


@pytest.mark.parametrize("command", list(COMMANDS))
def test_all_flags_together_reach_the_engine(command: str, engine_config_of) -> None:
    argv = COMMANDS[command] + [arg for case in CASES.values() for arg in case.argv]
    config = engine_config_of(argv)
    assert {name: case.read(config) for name, case in CASES.items()} == {
        name: case.expected for name, case in CASES.items()
    }


@pytest.mark.parametrize("command", list(COMMANDS))
def test_compile_is_left_to_the_platform_unless_a_flag_decides(command: str, engine_config_of) -> None:
    # generate and chat run a few hundred tokens: not worth a compile unless asked for.
    assert engine_config_of(COMMANDS[command] + TARGET).compile is (False if command in ("generate", "chat") else None)
    assert engine_config_of(COMMANDS[command] + TARGET + ["--no-compile"]).compile is False
    assert engine_config_of(COMMANDS[command] + TARGET + ["--compile"]).compile is True


def test_command_line_defaults_build_the_default_config_on_device_auto(engine_config_of) -> None:
    assert engine_config_of(COMMANDS["serve"] + TARGET) == EngineConfig(model="/ckpt/target", device="auto")


def test_llm_hands_every_keyword_to_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tokenmill.llm.LLMEngine", _capturing_engine)
    with pytest.raises(Captured) as info:
        LLM(show_progress=True, **{name: case.value for name, case in CASES.items()})
    config = info.value.config
    assert {name: case.read(config) for name, case in CASES.items()} == {
        name: case.expected for name, case in CASES.items()
    }
    assert info.value.kwargs == {"show_progress": True}


def test_llm_defaults_are_the_config_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tokenmill.llm.LLMEngine", _capturing_engine)
    with pytest.raises(Captured) as info:
        LLM("/ckpt/target", compile=True)
    assert info.value.config == EngineConfig(model="/ckpt/target", compile=True)
    assert info.value.kwargs == {"show_progress": False}


@pytest.mark.parametrize(("keyword", "suggestion"), [("max_model_length", "max_model_len"),
                                                     ("kv_cache_memory_bytes", "kv_cache_memory_gb"),
                                                     ("tensor_parallel_size", None)])
def test_unknown_llm_keyword_is_a_config_error_naming_it(keyword: str, suggestion: str | None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tokenmill.llm.LLMEngine", _capturing_engine)
    with pytest.raises(ConfigError) as info:
        LLM("/ckpt/target", **{keyword: 1})
    assert info.value.setting == keyword
    assert str(info.value).startswith(f"{keyword}: is not an engine setting")
    if suggestion:
        assert f"did you mean {suggestion!r}" in str(info.value)
    assert "max_num_batched_tokens" in str(info.value)  # the settings are listed


@pytest.mark.parametrize(
    ("kwargs", "setting", "limit"),
    [
        ({"dtype": "int3"}, "dtype", "auto, float32, bfloat16, float16"),
        ({"load_format": "gguf"}, "load_format", "auto, random"),
        ({"max_model_len": 0}, "max_model_len", "positive integer"),
        ({"block_size": 0}, "block_size", "positive integer"),
        ({"num_kv_blocks": -3}, "num_kv_blocks", "positive integer"),
        ({"kv_cache_memory_gb": 0.0}, "kv_cache_memory_gb", "> 0"),
        ({"kv_cache_memory_gb": float("nan")}, "kv_cache_memory_gb", "> 0"),
        ({"kv_cache_dtype": "int4"}, "kv_cache_dtype", "auto, int8, fp8"),
        ({"max_num_seqs": 0}, "max_num_seqs", "positive integer"),
        ({"kv_cache_memory": "0GiB"}, "kv_cache_memory", "more than 0 bytes"),
        ({"kv_cache_memory": "4 parsecs"}, "kv_cache_memory", "a byte size such as 4GiB"),
        ({"kv_cache_memory": -5}, "kv_cache_memory", "more than 0 bytes"),
        ({"kv_host_bytes": "lots"}, "kv_host_bytes", "a byte size such as 4GiB"),
        ({"kv_host_bytes": -1}, "kv_host_bytes", "more than 0 bytes"),
        ({"kv_disk_path": "/tmp/kvd"}, "kv_disk_bytes", "must be > 0 when kv_disk_path is set"),
        ({"kv_disk_bytes": "1GiB"}, "kv_disk_path", "is needed when kv_disk_bytes is set"),
        ({"kv_disk_path": "", "kv_disk_bytes": 5}, "kv_disk_path", "must be a folder path"),
        ({"kv_host_bytes": 5, "speculative_method": "draft", "draft_model": "/d"}, "kv_host_bytes",
         "hold the target's KV only"),
        ({"gpu_memory_utilization": 0.0}, "gpu_memory_utilization", "(0, 1]"),
        ({"gpu_memory_utilization": 1.01}, "gpu_memory_utilization", "(0, 1]"),
        ({"gpu_memory_utilization": float("nan")}, "gpu_memory_utilization", "(0, 1]"),
        ({"max_num_batched_tokens": 1.5}, "max_num_batched_tokens", "positive integer"),
        ({"speculative_method": "medusa"}, "speculative_method", "ngram, draft, ngram+draft"),
        ({"speculative_method": "ngram", "num_speculative_tokens": 17}, "num_speculative_tokens", "at most 16"),
        ({"speculative_method": "draft"}, "draft_model", "needs a draft_model"),
        ({"speculative_method": "ngram", "draft_dtype": "int8"}, "draft_dtype", "auto, float32"),
        ({"speculative_method": "ngram", "ngram_min": 0}, "ngram_min", "positive integer"),
        ({"speculative_method": "ngram", "ngram_min": 3, "ngram_max": 2}, "ngram_max", ">= ngram_min (3)"),
        ({"speculative_method": "draft", "draft_model": "/d", "draft_confidence_threshold": 1.0},
         "draft_confidence_threshold", "[0, 1)"),
        ({"reasoning_start": ""}, "reasoning_start", "non-empty"),
        ({"reasoning_end": ""}, "reasoning_end", "non-empty"),
    ],
)
def test_misconfiguration_is_a_config_error_naming_the_setting(kwargs: dict[str, Any], setting: str,
                                                                limit: str) -> None:
    with pytest.raises(ConfigError) as info:
        EngineArgs(model="/ckpt/target", **kwargs).create_engine_config()
    assert info.value.setting == setting
    assert str(info.value).startswith(f"{setting}: ") and limit in str(info.value)
    assert not isinstance(info.value, InvalidRequestError)  # a setting, not a request, is wrong


def test_command_line_misconfiguration_exits_2_naming_the_flag_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--prompt", "x", *TARGET, "--block-size", "0"]) == 2
    assert capsys.readouterr().err == "error: block_size: must be a positive integer, got 0\n"


def test_bench_refuses_model_and_model_config_together(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "latency", *TARGET, "--model-config", "/ckpt/target/config.json"]) == 2
    assert "model_config: give --model or --model-config, not both" in capsys.readouterr().err


def test_device_errors_are_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenmill import platform

    with pytest.raises(ConfigError, match=r"must be 'auto', 'cpu' or 'cuda\[:N\]', got 'tpu'") as info:
        platform.resolve_device("tpu")
    assert info.value.setting == "device"
    monkeypatch.setattr(platform, "cuda_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device is available") as info:
        platform.resolve_device("cuda:0")
    assert info.value.setting == "device"


def test_a_pool_smaller_than_the_context_is_a_config_error() -> None:
    from tokenmill.worker.kv_cache_alloc import check_pool_holds_context

    check_pool_holds_context(num_blocks=32, block_size=16, max_model_len=512)  # exactly fits
    with pytest.raises(ConfigError, match="holds 31 blocks x 16 tokens = 496 tokens") as info:
        check_pool_holds_context(num_blocks=31, block_size=16, max_model_len=512)
    assert info.value.setting == "max_model_len"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_no_model_means_the_default_model(command: str, engine_config_of) -> None:
    from tokenmill.model_catalog import default_model_name, resolve_model

    assert engine_config_of(COMMANDS[command]).model == resolve_model(default_model_name())


@pytest.mark.parametrize("command", list(COMMANDS))
def test_the_shipped_model_by_name_brings_its_draft(command: str, engine_config_of) -> None:
    from tokenmill.model_catalog import SHIPPED_DRAFT, SHIPPED_MODEL

    config = engine_config_of(COMMANDS[command] + ["--model", "tokenmill-py-13m", "--speculative-method", "draft"])
    assert (config.model, config.spec.draft_model) == (str(SHIPPED_MODEL), str(SHIPPED_DRAFT))
