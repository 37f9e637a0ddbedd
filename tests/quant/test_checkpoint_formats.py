"""GPTQ, AWQ and compressed-tensors layers converted to the canonical weight: packed here with the formats'
published layouts from random codes, scales and zero-points, they must dequantize to exactly the weights those
stand for; configs and tensors the formats allow but tokenmill cannot run are refused, naming what and why."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.quant_checkpoints import awq_tensors, ct_pack_tensors, expected_weight, gptq_tensors, random_layer
from tokenmill.errors import ConfigError, ModelLoadError
from tokenmill.quant.checkpoint_spec import checkpoint_quant_spec
from tokenmill.quant.codes import QuantSpec, dequantize
from tokenmill.quant.formats import checkpoint_format

OUT, IN = 48, 256
LAYER = "model.layers.0.mlp.up_proj"


def _gptq(bits=4, group_size=64, sym=False, **extra) -> dict:
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False, "sym": sym, **extra}


def _awq(group_size=64, **extra) -> dict:
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm", **extra}


def _ct(num_bits=4, group_size=64, symmetric=True, strategy="group", fmt="pack-quantized", kind="int") -> dict:
    weights = {"num_bits": num_bits, "type": kind, "symmetric": symmetric, "strategy": strategy,
               "group_size": group_size if strategy == "group" else None, "actorder": None}
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}},
            "ignore": ["lm_head"]}


def _check(entry: dict, stored: dict[str, torch.Tensor], expected: torch.Tensor, spec: QuantSpec) -> None:
    fmt = checkpoint_format(entry)
    assert fmt.spec == spec == checkpoint_quant_spec({"quantization_config": entry})
    qweight, scales, qzeros = fmt.convert(LAYER, stored)
    assert qweight.dtype == spec.qweight_dtype() and tuple(qweight.shape) == spec.qweight_shape(OUT, IN)
    assert scales.dtype == torch.float32 and tuple(scales.shape) == (OUT, spec.groups(IN))
    assert torch.equal(dequantize(spec, qweight, scales, qzeros), expected)


@pytest.mark.parametrize("sym, v1", [(False, True), (True, True), (False, False)])
def test_gptq_4bit(sym, v1):
    layer = random_layer(OUT, IN, 64, 4, np.random.default_rng(0), symmetric=sym)
    if not sym:  # the v1 wrap-around: a zero of 0 is stored as 15
        layer.zeros[0, 0] = 0
    entry = _gptq(sym=sym, **({} if v1 else {"checkpoint_format": "gptq_v2"}))
    _check(entry, gptq_tensors(layer, 4, 64, v1=v1), expected_weight(layer), QuantSpec("int4", 64, not sym))


def test_gptq_8bit_symmetric_is_int8():
    layer = random_layer(OUT, IN, 128, 8, np.random.default_rng(1), symmetric=True)
    _check(_gptq(bits=8, group_size=128, sym=True), gptq_tensors(layer, 8, 128), expected_weight(layer),
           QuantSpec("int8", 128))


def test_awq():
    layer = random_layer(OUT, IN, 64, 4, np.random.default_rng(2), symmetric=False)
    _check(_awq(), awq_tensors(layer), expected_weight(layer), QuantSpec("int4", 64, True))


@pytest.mark.parametrize("symmetric, packed_zeros", [(True, True), (False, True), (False, False)])
def test_compressed_tensors_pack_quantized_int4(symmetric, packed_zeros):
    layer = random_layer(OUT, IN, 64, 4, np.random.default_rng(3), symmetric=symmetric)
    _check(_ct(symmetric=symmetric), ct_pack_tensors(layer, 4, symmetric, packed_zeros), expected_weight(layer),
           QuantSpec("int4", 64, not symmetric))


def test_compressed_tensors_pack_quantized_int8_per_channel():
    layer = random_layer(OUT, IN, IN, 8, np.random.default_rng(4), symmetric=True)
    _check(_ct(num_bits=8, strategy="channel"), ct_pack_tensors(layer, 8, True), expected_weight(layer),
           QuantSpec("int8", None))


def test_compressed_tensors_int_quantized():
    rng = np.random.default_rng(5)
    weight = torch.from_numpy(rng.integers(-128, 128, size=(OUT, IN)).astype(np.int8))
    scale = torch.rand(OUT, 2, dtype=torch.float16) * 0.01
    expected = (weight.float().reshape(OUT, 2, -1) * scale.float().unsqueeze(-1)).reshape(OUT, IN)
    _check(_ct(num_bits=8, group_size=128, fmt="int-quantized"), {"weight": weight, "weight_scale": scale}, expected,
           QuantSpec("int8", 128))


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_compressed_tensors_float_quantized(strategy):
    weight = (torch.randn(OUT, IN, generator=torch.Generator().manual_seed(6)) * 100).to(torch.float8_e4m3fn)
    scale = (torch.rand(OUT, 1) * 0.01 if strategy == "channel" else torch.tensor([0.003])).to(torch.bfloat16)
    expected = weight.float() * scale.float().reshape(-1, 1).expand(OUT, 1)  # a tensor scale: every channel's
    _check(_ct(num_bits=8, kind="float", strategy=strategy, fmt="float-quantized"),
           {"weight": weight, "weight_scale": scale}, expected, QuantSpec("fp8"))


# ---- refused -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry, setting, message", [
    (_gptq(bits=3), "quantization_config.bits", "3 is not supported (supported: 4, 8)"),
    (_gptq(bits=8, sym=False), "quantization_config.sym", "8-bit GPTQ with zero-points"),
    (_gptq(group_size=-1), "quantization_config.group_size", "-1 (one group per output channel)"),
    (_gptq(group_size=20), "quantization_config.group_size", "multiple of 8, got 20"),
    (_gptq(checkpoint_format="marlin"), "quantization_config.checkpoint_format", "'marlin' is not supported"),
    (_awq(version="gemv"), "quantization_config.version", "'gemv' is not supported"),
    (_awq(zero_point=False), "quantization_config.zero_point", "without zero-points"),
    (_ct(num_bits=2), "quantization_config.config_groups.weights.num_bits", "2 is not supported"),
    (_ct(strategy="tensor"), "quantization_config.config_groups.weights.strategy", "'tensor' is not supported"),
    (_ct(strategy="channel"), "quantization_config.config_groups.weights.group_size", "-1 (one group per output"),
    (_ct(fmt="sparse-24-bitmask"), "quantization_config.format", "'sparse-24-bitmask' is not supported"),
    ({"quant_method": "bitsandbytes"}, "quantization_config.quant_method",
     "'bitsandbytes' is not supported (supported: tokenmill, gptq, awq, compressed-tensors)"),
])
def test_configs_tokenmill_cannot_run_are_refused(entry, setting, message):
    with pytest.raises(ConfigError) as info:
        checkpoint_quant_spec({"quantization_config": entry})
    assert info.value.setting == setting and message in info.value.message


def _gptq_layer(**kw) -> dict[str, torch.Tensor]:
    return gptq_tensors(random_layer(OUT, IN, 64, 4, np.random.default_rng(7), symmetric=False), 4, 64, **kw)


def test_act_order_g_idx_is_refused_naming_the_tensor():
    g_idx = np.random.default_rng(8).permutation(np.arange(IN) // 64)
    with pytest.raises(ModelLoadError, match=rf"tensor {LAYER}\.g_idx: .*out of order \(act-order / desc_act\)"):
        checkpoint_format(_gptq(desc_act=True)).convert(LAYER, _gptq_layer(g_idx=g_idx))
    # desc_act set but the identity assignment: loads
    checkpoint_format(_gptq(desc_act=True)).convert(LAYER, _gptq_layer())


@pytest.mark.parametrize("leaf, bad, message", [
    ("scales", torch.zeros(3, OUT, dtype=torch.float16), rf"{LAYER}\.scales: shape \(3, 48\), expected \(4, 48\)"),
    ("qzeros", torch.zeros(4, 5, dtype=torch.int32), rf"{LAYER}\.qzeros: shape \(4, 5\), expected \(4, 6\)"),
    ("qweight", torch.zeros(32, OUT, dtype=torch.int64), rf"{LAYER}\.qweight: expected int32 packed words"),
])
def test_wrong_packed_tensors_are_refused_naming_the_tensor(leaf, bad, message):
    stored = _gptq_layer()
    stored[leaf] = bad
    with pytest.raises(ModelLoadError, match=message):
        checkpoint_format(_gptq()).convert(LAYER, stored)


def test_a_group_that_does_not_divide_the_width_is_refused():
    stored = _gptq_layer()
    with pytest.raises(ModelLoadError, match=rf"{LAYER}\.qweight: input width 256 is not a multiple of the group "
                                             r"size 96"):
        checkpoint_format(_gptq(group_size=96)).convert(LAYER, stored)


def test_compressed_tensors_weight_shape_must_match_the_packed_tensor():
    stored = ct_pack_tensors(random_layer(OUT, IN, 64, 4, np.random.default_rng(9), symmetric=True), 4, True)
    stored["weight_shape"] = torch.tensor([OUT, 2 * IN])
    with pytest.raises(ModelLoadError, match=rf"{LAYER}\.weight_packed: shape \(48, 32\), expected \(48, 64\)"):
        checkpoint_format(_ct()).convert(LAYER, stored)
