"""The `quantization` setting's spelling and defaults, and how it meets a checkpoint's own quantization."""

from __future__ import annotations

import pytest

from tokenmill.config import EngineConfig
from tokenmill.errors import ConfigError
from tokenmill.quant.checkpoint_spec import checkpoint_quant_spec
from tokenmill.quant.codes import QuantSpec
from tokenmill.quant.settings import parse_quantization, quantizes_lm_head, resolve_quant_spec


@pytest.mark.parametrize(("value", "spec"), [
    ("int8", QuantSpec("int8")), ("int8:g32", QuantSpec("int8", 32)), ("fp8", QuantSpec("fp8")),
    ("int4", QuantSpec("int4", 64, True)), ("INT4:g128:sym", QuantSpec("int4", 128, False)),
    ("w2", QuantSpec("w2", 64, True)), ("w2:g32", QuantSpec("w2", 32, True)), ("none", None), ("None", None),
    ("int8:head", QuantSpec("int8")), ("int4:g32:head", QuantSpec("int4", 32, True)),
])
def test_spellings_and_defaults(value: str, spec: QuantSpec | None) -> None:
    assert parse_quantization(value) == spec


def test_the_engine_config_checks_the_setting() -> None:
    with pytest.raises(ConfigError, match="quantization: unknown method 'int3'"):
        EngineConfig(model="m", quantization="int3")
    assert EngineConfig(model="m", quantization="w2:g32").quantization == "w2:g32"


def test_a_float_checkpoint_quantizes_on_load_only_when_asked() -> None:
    assert resolve_quant_spec(None, None) == (None, False)
    assert resolve_quant_spec("int8", None) == (QuantSpec("int8"), True)
    assert resolve_quant_spec("none", None) == (None, False)


def test_a_quantized_checkpoint_loads_as_it_is_or_dequantized() -> None:
    stored = QuantSpec("int4", 32, True)
    assert resolve_quant_spec(None, stored) == (stored, False)
    assert resolve_quant_spec("none", stored) == (None, False)
    assert resolve_quant_spec("int4", stored) == (stored, False)
    assert resolve_quant_spec("int4:g32", stored) == (stored, False)
    with pytest.raises(ConfigError, match="'int4:g32:sym' was asked for, but the checkpoint is quantized as int4:g32"):
        resolve_quant_spec("int4:g32:sym", stored)
    with pytest.raises(ConfigError, match="'w2' was asked for"):
        resolve_quant_spec("w2", stored)


def test_checkpoint_spec_lookup() -> None:
    assert checkpoint_quant_spec({"architectures": ["LlamaForCausalLM"]}) is None
    spec = QuantSpec("w2", 64, True)
    assert checkpoint_quant_spec({"quantization_config": spec.to_config()}) == spec
    with pytest.raises(ConfigError, match="quantization_config: expected an object"):
        checkpoint_quant_spec({"quantization_config": "int8"})


def test_the_head_option_says_which_layers_not_how() -> None:
    assert [quantizes_lm_head(v) for v in ("int8:head", "int4:HEAD:g32", "int8", None, "none")] == \
        [True, True, False, False, False]
    stored = QuantSpec("int4", 32, True)  # e.g. GGUF Q4_1: ":head" alone keeps the checkpoint's scheme
    assert resolve_quant_spec("int4:head", stored) == (stored, False)
    with pytest.raises(ConfigError, match="'int4:g64:head' was asked for"):
        resolve_quant_spec("int4:g64:head", stored)
    with pytest.raises(ConfigError, match=":head to quantize the LM head too"):
        parse_quantization("int8:heads")
