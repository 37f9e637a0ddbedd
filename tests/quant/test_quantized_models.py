"""Quantized models end to end: `quantization=` quantizes a float checkpoint on load, a tokenmill quantized
checkpoint loads with no flags, and either generates exactly what the float model with the dequantized
weights generates (greedy, float32). Bad settings fail with errors that name them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.checkpoints import make_checkpoint
from tests.e2e.conftest import make_prompts
from tests.quant.quantized_checkpoints import write_dequantized_copy, write_quantized_copy
from tokenmill import LLM, SamplingParams
from tokenmill.errors import ConfigError, ModelLoadError
from tokenmill.quant.codes import QuantSpec
from tokenmill.quant.linear_method import QuantizedLinearMethod
from tokenmill.quant.settings import parse_quantization

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NEW_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
# The tiny Llama's o_proj reads 96 columns (4 heads x 24): group 32 divides every width, 64 does not.
SETTINGS = ["int8", "int8:g32", "int4:g32", "int4:g32:sym", "w2:g32", "fp8"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("llama", tmp_path_factory.mktemp("llama"))


def _greedy(model: Path | str, **kwargs) -> list[list[int]]:
    llm = LLM(model=str(model), dtype="float32", max_model_len=256, **kwargs)
    prompts = make_prompts(lengths=[1, 9, 40])
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)]


def _linear_methods(llm: LLM) -> set[str]:
    model = llm.engine.worker.model
    return {type(m.quant_method).__name__ for m in model.modules() if hasattr(m, "quant_method")}


@pytest.mark.parametrize("setting", SETTINGS)
def test_quantize_on_load_generates_what_the_dequantized_model_does(setting: str, llama: Path,
                                                                    tmp_path: Path) -> None:
    dequantized = write_dequantized_copy(llama, tmp_path / "dequantized", parse_quantization(setting))
    assert _greedy(llama, quantization=setting) == _greedy(dequantized)


@pytest.mark.parametrize("setting", SETTINGS)
def test_a_quantized_checkpoint_loads_without_flags(setting: str, llama: Path, tmp_path: Path) -> None:
    spec = parse_quantization(setting)
    quantized = write_quantized_copy(llama, tmp_path / "quantized", spec)
    dequantized = write_dequantized_copy(llama, tmp_path / "dequantized", spec)
    expected = _greedy(dequantized)
    assert _greedy(quantized) == expected
    assert _greedy(quantized, quantization=spec.method) == expected  # asking for its own method is fine


def test_the_lm_head_and_embeddings_stay_float(llama: Path) -> None:
    llm = LLM(model=str(llama), dtype="float32", quantization="int8", max_model_len=64)
    model = llm.engine.worker.model
    assert not isinstance(model.lm_head.quant_method, QuantizedLinearMethod)
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == model.model.layers[0].\
        input_layernorm.weight.dtype
    assert isinstance(model.model.layers[0].mlp.gate_up_proj.quant_method, QuantizedLinearMethod)


# An untied head (llama) and a tied one (llama3: the embedding stays float, the head is its quantized copy).
@pytest.mark.parametrize(("family", "setting"), [("llama", "int8:head"), ("llama3", "int8:head"),
                                                 ("llama", "int4:g32:head")])
def test_the_head_option_generates_what_the_dequantized_head_does(family: str, setting: str,
                                                                  tmp_path: Path) -> None:
    path = make_checkpoint(family, tmp_path / family)
    dequantized = write_dequantized_copy(path, tmp_path / "dequantized", parse_quantization(setting), head=True)
    assert _greedy(path, quantization=setting) == _greedy(dequantized)


# Experts stay float (qwen3_moe); a tied head stays the embedding (llama3); q/k/v biases stay float (qwen2);
# Gemma 2's sandwiched norms and GeGLU around quantized projections.
@pytest.mark.parametrize("family", ["qwen3_moe", "llama3", "qwen2", "gemma2"])
def test_other_families_quantize(family: str, tmp_path: Path) -> None:
    path = make_checkpoint(family, tmp_path / family)
    dequantized = write_dequantized_copy(path, tmp_path / "dequantized", QuantSpec("int8"))
    assert _greedy(path, quantization="int8") == _greedy(dequantized)


def test_random_weights_quantize_too(llama: Path) -> None:
    tokens = _greedy(llama, quantization="int4:g32", load_format="random")
    assert len(tokens) == 3 and all(len(t) == NEW_TOKENS for t in tokens)


@pytest.mark.parametrize(("setting", "error", "message"), [
    ("nf4", ConfigError, "quantization: unknown method 'nf4'"),
    ("int4:x7", ConfigError, "quantization: unknown option 'x7'"),
    ("int4:g12", ConfigError, "quantization.group_size: int4 takes a group size that is a multiple of 8, got 12"),
    ("fp8:g32", ConfigError, "fp8 takes no group size"),
    ("int4", ConfigError, r"quantization.group_size: group size 64 does not divide the layer width 96 \(a group "
                          r"size that divides it: 32\)"),
])
def test_bad_settings_are_refused_by_name(setting: str, error: type, message: str, llama: Path) -> None:
    with pytest.raises(error, match=message):
        LLM(model=str(llama), dtype="float32", quantization=setting, max_model_len=64)


def test_asking_for_another_method_than_the_checkpoints_is_an_error(llama: Path, tmp_path: Path) -> None:
    quantized = write_quantized_copy(llama, tmp_path / "quantized", QuantSpec("int4", 32, True))
    with pytest.raises(ConfigError, match="'int8' was asked for, but the checkpoint is quantized as int4:g32"):
        LLM(model=str(quantized), dtype="float32", quantization="int8", max_model_len=64)
    with pytest.raises(ConfigError, match="'int4:g64' was asked for"):
        LLM(model=str(quantized), dtype="float32", quantization="int4:g64", max_model_len=64)


def test_a_checkpoint_with_wrong_packed_shapes_is_refused(llama: Path, tmp_path: Path) -> None:
    import json

    quantized = write_quantized_copy(llama, tmp_path / "quantized", QuantSpec("int4", 32, True))
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"]["method"] = "w2"  # int4's packed widths where 2-bit ones belong
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"_proj\.(qweight|scales|qzeros): shape \(\d+, \d+\), expected"):
        LLM(model=str(quantized), dtype="float32", max_model_len=64)


def test_an_unknown_checkpoint_quantization_is_refused(llama: Path, tmp_path: Path) -> None:
    import json
    import shutil

    copy = Path(shutil.copytree(llama, tmp_path / "copy"))
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="quantization_config.quant_method: 'bitsandbytes' is not supported"):
        LLM(model=str(copy), dtype="float32", max_model_len=64)


def test_a_float_gguf_file_quantizes_like_its_safetensors_twin(tmp_path: Path) -> None:
    """The GGUF loader re-quantizes float linear tensors itself (round-to-nearest, as the layers do for
    safetensors): the same codes, so the same tokens as the transformers folder it was written from."""
    pytest.importorskip("gguf")
    from tests.gguf_files import make_gguf

    gguf = make_gguf("qwen3", tmp_path)
    assert _greedy(gguf, quantization="int4:g32") == _greedy(tmp_path / "hf", quantization="int4:g32")
