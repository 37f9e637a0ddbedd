"""Every quantized linear method against its dequantized twin on random weights: the codes a fused layer holds
after loading are exactly the checkpoint's (or RTN's, when quantizing on load), and its matmul equals
x @ dequantize(...).T (aten's packed kernels where they apply, the tiled path elsewhere), at a decode's and a
prefill's row counts."""

from __future__ import annotations

import pytest
import torch

from tokenmill.errors import ConfigError, ModelLoadError
from tokenmill.layers.linear import LMHead, MergedLinear, UnquantizedLinearMethod
from tokenmill.quant.codes import QuantSpec, codes_of, dequantize, quantize_rtn
from tokenmill.quant.methods import make_quant_method

SPECS = [QuantSpec("int8"), QuantSpec("int8", 32), QuantSpec("int4", 32), QuantSpec("int4", 64, True),
         QuantSpec("int4", 128, True), QuantSpec("w2", 32, True), QuantSpec("w2", 64, True), QuantSpec("fp8")]
SHARDS = {"q": 64, "k": 32, "v": 32}  # 128 rows: a multiple of 16, as aten's int4 kernel wants
WIDTH = 256
ROWS = [1, 21]


def _layer(spec: QuantSpec, on_load: bool, dtype: torch.dtype = torch.float32, shards: dict[str, int] = SHARDS,
           width: int = WIDTH, bias: bool = False) -> MergedLinear:
    method = make_quant_method(spec, quantize_on_load=on_load)
    return MergedLinear(width, list(shards.values()), list(shards), bias, dtype, torch.device("cpu"), method)


def _float_shards(seed: int, shards: dict[str, int] = SHARDS, width: int = WIDTH) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(rows, width, generator=generator) * 0.05 for name, rows in shards.items()}


def _load_canonical(layer: MergedLinear, spec: QuantSpec, shards: dict[str, torch.Tensor]) -> tuple:
    """Load each shard's canonical tensors by name, as a quantized checkpoint would; returns the whole
    layer's expected (qweight, scales, qzeros)."""
    parts = {name: quantize_rtn(spec, weight) for name, weight in shards.items()}
    first = next(iter(parts.values()))
    for index, tensor_name in enumerate(("qweight", "scales", "qzeros")):
        if first[index] is None:
            continue
        param = getattr(layer, tensor_name)
        for shard, quantized in parts.items():
            param.weight_loader(param, quantized[index], shard)
    return tuple(None if first[i] is None else torch.cat([p[i] for p in parts.values()]) for i in range(3))


def _assert_matmul_matches(layer: MergedLinear, spec: QuantSpec, expected: tuple, dtype: torch.dtype) -> None:
    weight = dequantize(spec, *expected)
    generator = torch.Generator().manual_seed(7)
    for rows in ROWS:
        x = torch.randn(rows, WIDTH, generator=generator).to(dtype)
        reference = x.float() @ weight.T
        got = layer(x)
        assert got.dtype == dtype and got.shape == (rows, layer.output_size)
        # float32: summation order only; bfloat16: the activations' and (packed kernels') scales' rounding.
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        scale = reference.abs().max().item()
        assert (got.float() - reference).abs().max().item() <= tolerance * scale, (spec, rows)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_checkpoint_codes_load_exactly_and_matmul_equals_twin(spec: QuantSpec, dtype: torch.dtype) -> None:
    layer = _layer(spec, on_load=False, dtype=dtype)
    expected = _load_canonical(layer, spec, _float_shards(0))
    assert torch.equal(codes_of(spec, layer.qweight.data).view(torch.uint8),
                       codes_of(spec, expected[0]).view(torch.uint8))  # exact codes, fp8 compared bit for bit
    assert torch.equal(layer.scales.data, expected[1])
    if expected[2] is not None:
        assert torch.equal(layer.qzeros.data, expected[2])
    layer.quant_method.process_weights_after_loading(layer)
    _assert_matmul_matches(layer, spec, expected, dtype)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_quantize_on_load_quantizes_each_shard_with_rtn(spec: QuantSpec) -> None:
    layer = _layer(spec, on_load=True)
    assert layer.weight.is_meta  # the loader's target holds no memory
    shards = _float_shards(1)
    for name, weight in shards.items():
        layer.weight.weight_loader(layer.weight, weight, name)
    expected = quantize_rtn(spec, torch.cat(list(shards.values())))
    assert torch.equal(codes_of(spec, layer.qweight).view(torch.uint8), codes_of(spec, expected[0]).view(torch.uint8))
    assert torch.equal(layer.scales, expected[1])
    layer.quant_method.process_weights_after_loading(layer)
    assert not hasattr(layer, "weight") and "weight" not in dict(layer.named_parameters())
    _assert_matmul_matches(layer, spec, expected, torch.float32)


@pytest.mark.parametrize("spec", [QuantSpec("int4", 32, True), QuantSpec("int4", 16, True), QuantSpec("int8", 16)],
                         ids=str)
def test_shapes_the_packed_kernels_refuse_take_the_tiled_path(spec: QuantSpec) -> None:
    shards = {"gate": 20, "up": 20}  # 40 rows: not a multiple of 16; group 16: not an int4 kernel group size
    layer = _layer(spec, on_load=False, shards=shards, width=64)
    parts = _float_shards(2, shards, 64)
    expected = _load_canonical(layer, spec, parts)
    layer.quant_method.process_weights_after_loading(layer)
    assert not getattr(layer, "int4pack", False)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(layer(x), x @ dequantize(spec, *expected).T, rtol=1e-5, atol=1e-6)


def test_bias_stays_float_and_is_added() -> None:
    spec = QuantSpec("int8")
    layer = _layer(spec, on_load=True, bias=True)
    shards = _float_shards(4)
    bias = torch.randn(layer.output_size)
    for name, weight in shards.items():
        layer.weight.weight_loader(layer.weight, weight, name)
    layer.bias.weight_loader(layer.bias, bias)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(2, WIDTH)
    weight = dequantize(spec, *quantize_rtn(spec, torch.cat(list(shards.values()))))
    torch.testing.assert_close(layer(x), x @ weight.T + bias, rtol=1e-5, atol=1e-5)


def test_the_lm_head_keeps_its_float_method() -> None:
    float_method = UnquantizedLinearMethod()
    method = make_quant_method(QuantSpec("int8"), quantize_on_load=True, float_method=float_method)
    head = LMHead(64, 100, False, torch.float32, torch.device("cpu"), method)
    assert head.quant_method is float_method and head.weight.shape == (100, 64) and not head.weight.is_meta


def test_group_size_must_divide_the_layer_width() -> None:
    with pytest.raises(ConfigError, match="group size 128 does not divide the layer width 96"):
        _layer(QuantSpec("int4", 128), on_load=True, width=96)


@pytest.mark.parametrize(("name", "bad", "message"), [
    ("qweight", torch.zeros(64, 100, dtype=torch.uint8), r"qweight shape \(64, 100\) does not fit \(64, 128\)"),
    ("qweight", torch.zeros(64, 128), "qweight of a int4 layer must be torch.uint8, got torch.float32"),
    ("scales", torch.zeros(64, 4), r"scales shape \(64, 4\) does not fit \(64, 8\)"),
    ("qzeros", torch.zeros(64, 8, dtype=torch.int32), "qzeros must be a float tensor"),
])
def test_wrong_packed_tensors_are_refused_by_name(name: str, bad: torch.Tensor, message: str) -> None:
    layer = _layer(QuantSpec("int4", 32, True), on_load=False)
    param = getattr(layer, name)
    with pytest.raises(ModelLoadError, match=message):
        param.weight_loader(param, bad, "q")


@pytest.mark.parametrize(("shape", "shard", "message"), [
    ((64, 200), "q", r"shape \(64, 200\) does not fit \(64, 256\)"),
    ((60, 256), "k", r"shape \(60, 256\) does not fit \(32, 256\)"),
    ((32, 256), "x", "MergedLinear has no shard 'x'"),
])
def test_quantize_on_load_refuses_a_weight_of_the_wrong_shape(shape: tuple, shard: str, message: str) -> None:
    layer = _layer(QuantSpec("int4", 32, True), on_load=True)
    with pytest.raises(ModelLoadError, match=message):
        layer.weight.weight_loader(layer.weight, torch.zeros(shape), shard)


@pytest.mark.parametrize("spec", [QuantSpec("int8"), QuantSpec("fp8"), QuantSpec("w2", 64, True),
                                  QuantSpec("int4", 128, True)], ids=str)
def test_the_tiled_path_covers_wide_layers(spec: QuantSpec) -> None:
    """640 columns: two full tiles of 256 and a partial one (the tiled path; int8 per channel: the int8 kernel)."""
    shards = {"o": 32}
    layer = _layer(spec, on_load=False, shards=shards, width=640)
    expected = _load_canonical(layer, spec, _float_shards(5, shards, 640))
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(ROWS[-1], 640, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(layer(x), x @ dequantize(spec, *expected).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_a_loaded_layer_holds_only_its_kernel_tensors_as_parameters(spec: QuantSpec) -> None:
    """Codes and scales, once (no canonical copy beside a repacked one), as parameters at their real size:
    what the bench's roofline counts as the bytes a step reads."""
    layer = _layer(spec, on_load=True)
    for name, weight in _float_shards(8).items():
        layer.weight.weight_loader(layer.weight, weight, name)
    layer.quant_method.process_weights_after_loading(layer)
    rows, groups = layer.output_size, spec.groups(WIDTH)
    expected = rows * WIDTH * spec.bits // 8 + rows * groups * 4 * (2 if spec.method in ("int4", "w2") else 1)
    assert sum(p.numel() * p.element_size() for p in layer.parameters()) == expected
    assert not list(layer.buffers())
