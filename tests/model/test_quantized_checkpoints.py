"""GPTQ, AWQ and compressed-tensors checkpoints of a tiny Llama, packed with the formats' published layouts
(tests/quant_checkpoints.py): loaded without quantization they equal the float checkpoint of the weights they
stand for, parameter for parameter; loaded for a quantized model the loader hands over canonical tensors that
dequantize to the same weights; bad files are refused naming the tensor."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.checkpoints import make_checkpoint
from tests.quant_checkpoints import (awq_tensors, ct_pack_tensors, expected_weight, gptq_tensors, random_layer,
                                     write_quantized_checkpoint)
from tokenmill.engine_args import EngineArgs
from tokenmill.errors import ConfigError, ModelLoadError
from tokenmill.models.loader import _safetensors_tensors, checkpoint_config_dict, load_model
from tokenmill.models.quantized_checkpoint import quantized_checkpoint_tensors
from tokenmill.quant.checkpoint_spec import checkpoint_quant_spec
from tokenmill.quant.codes import QuantSpec, dequantize, pack_codes

GROUP = 32


def _gptq(layer_name, out, width, rng, sym=False):
    layer = random_layer(out, width, GROUP, 4, rng, symmetric=sym)
    return gptq_tensors(layer, 4, GROUP), expected_weight(layer)


def _awq(layer_name, out, width, rng):
    layer = random_layer(out, width, GROUP, 4, rng, symmetric=False)
    return awq_tensors(layer), expected_weight(layer)


def _tokenmill(layer_name, out, width, rng):  # already canonical: codes packed two to a byte, rows first
    layer = random_layer(out, width, GROUP, 4, rng, symmetric=False)
    stored = {"qweight": pack_codes(torch.from_numpy(layer.codes), 4), "scales": torch.from_numpy(layer.scales),
              "qzeros": torch.from_numpy(layer.zeros).float()}
    return stored, expected_weight(layer)


def _ct(layer_name, out, width, rng):
    layer = random_layer(out, width, GROUP, 4, rng, symmetric=False)
    return ct_pack_tensors(layer, 4, symmetric=False), expected_weight(layer)


SPEC = QuantSpec("int4", GROUP, True)
_CT_CONFIG = {"quant_method": "compressed-tensors", "format": "pack-quantized",
              "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "weights": {
                  "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": GROUP}}},
              "ignore": ["lm_head"]}
FORMATS = {
    "gptq": ({"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": False}, _gptq),
    "awq": ({"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}, _awq),
    "compressed-tensors": (_CT_CONFIG, _ct),
    "tokenmill": (SPEC.to_config(), _tokenmill),
}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_checkpoint("llama", tmp_path_factory.mktemp("float"))  # q/k/v 96/48/48 rows, gate/up fused


@pytest.fixture(scope="module", params=list(FORMATS))
def checkpoints(request, source, tmp_path_factory) -> tuple[Path, Path]:
    config, layer_tensors = FORMATS[request.param]
    return write_quantized_checkpoint(source, tmp_path_factory.mktemp(request.param), config, layer_tensors)


def test_dequantized_load_equals_the_float_checkpoint(checkpoints):
    quantized, reference = checkpoints
    got, _ = load_model(quantized, dtype="float32")
    want, _ = load_model(reference, dtype="float32")
    want_params = dict(want.named_parameters())
    for name, param in got.named_parameters():
        assert torch.equal(param, want_params[name]), name


def test_a_quantized_model_gets_canonical_tensors(checkpoints):
    quantized, reference = checkpoints
    config = checkpoint_config_dict(quantized)
    assert checkpoint_quant_spec(config) == SPEC
    tensors = {t.name: t for t in quantized_checkpoint_tensors(_safetensors_tensors(quantized), config, SPEC)}
    floats = {t.name: t for t in _safetensors_tensors(reference)}
    layer = "model.layers.1.self_attn.k_proj"
    assert f"{layer}.weight" not in tensors and f"{layer}.g_idx" not in tensors
    parts = {leaf: tensors[f"{layer}.{leaf}"].read() for leaf in ("qweight", "scales", "qzeros")}
    assert parts["qweight"].shape == (48, 32) and parts["scales"].shape == (48, 2)
    assert torch.equal(dequantize(SPEC, **parts), floats[f"{layer}.weight"].read())
    assert torch.equal(tensors["lm_head.weight"].read(), floats["lm_head.weight"].read())  # unquantized: as is


def test_a_model_quantized_otherwise_is_refused(checkpoints):
    quantized, _ = checkpoints
    with pytest.raises(ConfigError, match=r"quantization: the checkpoint is .* int4 g32 with zero-points; it loads "
                                          r"as that or dequantized \('none'\), not as int8 per channel"):
        quantized_checkpoint_tensors(_safetensors_tensors(quantized), checkpoint_config_dict(quantized),
                                     QuantSpec("int8"))


def test_a_layer_missing_a_tensor_is_refused_naming_it(source, tmp_path):
    config, _ = FORMATS["gptq"]

    def without_zeros(name, out, width, rng):
        stored, expected = _gptq(name, out, width, rng)
        return ({k: v for k, v in stored.items() if k != "qzeros"} if name.endswith("layers.0.mlp.up_proj")
                else stored), expected

    quantized, _ = write_quantized_checkpoint(source, tmp_path, config, without_zeros)
    with pytest.raises(ModelLoadError, match=r"model.safetensors: quantized layer model.layers.0.mlp.up_proj lacks "
                                             r"model.layers.0.mlp.up_proj.qzeros \(gptq format\)"):
        load_model(quantized, dtype="float32")


def test_a_bad_tensor_is_refused_naming_file_and_tensor(source, tmp_path):
    config, _ = FORMATS["awq"]

    def short_scales(name, out, width, rng):
        stored, expected = _awq(name, out, width, rng)
        if name.endswith("layers.1.self_attn.o_proj"):
            stored["scales"] = stored["scales"][:1]
        return stored, expected

    quantized, _ = write_quantized_checkpoint(source, tmp_path, config, short_scales)
    with pytest.raises(ModelLoadError, match=r"model.safetensors: tensor model.layers.1.self_attn.o_proj.scales: "
                                             r"shape \(1, 64\), expected \(3, 64\)"):
        load_model(quantized, dtype="float32")


def test_a_config_tokenmill_cannot_run_is_refused_at_load(source, tmp_path):
    config = dict(FORMATS["gptq"][0], bits=3)
    quantized, _ = write_quantized_checkpoint(source, tmp_path, config, _gptq)
    with pytest.raises(ConfigError, match=r"quantization_config.bits: 3 is not supported \(supported: 4, 8\)"):
        load_model(quantized, dtype="float32")
    assert json.loads((quantized / "config.json").read_text())["quantization_config"]["bits"] == 3


# ---- end to end through the quantized methods -----------------------------------------------------------

HAS_METHODS = "quantization" in {f.name for f in dataclasses.fields(EngineArgs)}


@pytest.mark.skipif(not HAS_METHODS, reason="needs quant methods (h-qmeth)")
@pytest.mark.usefixtures("one_torch_thread")
def test_the_engine_runs_the_checkpoint_as_int4_like_its_dequantized_twin(checkpoints):
    from tokenmill import LLM, SamplingParams

    quantized, reference = checkpoints
    params = SamplingParams(max_tokens=12, temperature=0.0)
    prompts = [[1, 5, 9, 33, 7], [1, 200, 17]]
    as_int4 = LLM(model=str(quantized), dtype="float32", compile=False).generate(prompts, params)
    as_float = LLM(model=str(reference), dtype="float32", compile=False).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in as_int4] == [o.outputs[0].token_ids for o in as_float]


def test_a_tokenmill_layer_of_the_wrong_dtype_is_refused(source, tmp_path):
    def int8_codes(name, out, width, rng):
        stored, expected = _tokenmill(name, out, width, rng)
        if name.endswith("layers.0.self_attn.q_proj"):
            stored["qweight"] = stored["qweight"].to(torch.int8)
        return stored, expected

    quantized, _ = write_quantized_checkpoint(source, tmp_path, SPEC.to_config(), int8_codes)
    with pytest.raises(ModelLoadError, match=r"tensor model.layers.0.self_attn.q_proj.qweight: expected torch.uint8 "
                                             r"\[output, input / 2\] for int4, got torch.int8 \(96, 32\)"):
        load_model(quantized, dtype="float32")


def test_autogptq_legacy_quantize_config_json_is_read(source, tmp_path):
    """Early AutoGPTQ checkpoints state the quantization in quantize_config.json, not in config.json."""
    entry, layer_tensors = FORMATS["gptq"]
    quantized, reference = write_quantized_checkpoint(source, tmp_path, entry, layer_tensors)
    config = json.loads((quantized / "config.json").read_text())
    legacy = config.pop("quantization_config")
    legacy.pop("quant_method")
    (quantized / "config.json").write_text(json.dumps(config))
    (quantized / "quantize_config.json").write_text(json.dumps(legacy))
    assert checkpoint_quant_spec(checkpoint_config_dict(quantized)) == SPEC
    got, _ = load_model(quantized, dtype="float32")
    want, _ = load_model(reference, dtype="float32")
    assert torch.equal(got.model.layers[0].mlp.gate_up_proj.weight, want.model.layers[0].mlp.gate_up_proj.weight)
