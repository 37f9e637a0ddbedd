"""The CPU kernel paths of the weight-only methods, each against its dequantized twin: the tiled float32 slabs
(several slabs and a partial one), the switch from aten's int8 kernel to the slabs at
INT8_DEQUANT_GEMM_MIN_ROWS rows, and the LM head quantized with the `:head` option."""

from __future__ import annotations

import pytest
import torch

from tokenmill.errors import ConfigError
from tokenmill.layers.linear import LMHead, ReplicatedLinear, UnquantizedLinearMethod, VocabEmbedding
from tokenmill.quant import cpu_kernels, int8
from tokenmill.quant.codes import QuantSpec, dequantize, quantize_rtn
from tokenmill.quant.lm_head import QuantizedLMHeadMethod
from tokenmill.quant.methods import make_quant_method

CPU = torch.device("cpu")


def _weight(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)) * 0.05


def _close(got: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> None:
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bfloat16: the activations' and output's rounding
    assert got.dtype == dtype
    assert (got.float() - reference).abs().max().item() <= tolerance * reference.abs().max().item()


@pytest.mark.parametrize("spec", [QuantSpec("int8"), QuantSpec("int8", 32), QuantSpec("int4", 32, True),
                                  QuantSpec("w2", 64, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_slabs_match_the_dequantized_twin(spec: QuantSpec, dtype: torch.dtype,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels, "_SLAB_FLOATS", 16 * 128)  # 16-row slabs: 40 rows are 16 + 16 + 8
    qweight, scales, qzeros = quantize_rtn(spec, _weight(40, 128))
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = cpu_kernels.tiled_dequant_matmul(x, qweight, scales.float(), qzeros, spec.bits)
    _close(got, x.float() @ dequantize(spec, qweight, scales, qzeros).T, dtype)


def _int8_layer(weight: torch.Tensor, dtype: torch.dtype) -> ReplicatedLinear:
    layer = ReplicatedLinear(weight.shape[1], weight.shape[0], False, dtype, CPU,
                             make_quant_method(QuantSpec("int8"), quantize_on_load=True))
    layer.weight.weight_loader(layer.weight, weight)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_switches_to_the_slabs_at_the_documented_row_count(dtype: torch.dtype,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    packed, tiled = int8.int8pack_matmul, int8.tiled_dequant_matmul
    monkeypatch.setattr(int8, "int8pack_matmul", lambda *a: calls.append("int8pack") or packed(*a))
    monkeypatch.setattr(int8, "tiled_dequant_matmul", lambda *a: calls.append("tiled") or tiled(*a))
    weight = _weight(48, 64)
    layer = _int8_layer(weight, dtype)
    twin = dequantize(QuantSpec("int8"), *quantize_rtn(QuantSpec("int8"), weight))
    threshold = cpu_kernels.INT8_DEQUANT_GEMM_MIN_ROWS
    assert threshold == 128
    for rows in (1, threshold - 1, threshold, 3 * threshold):
        x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)).to(dtype)
        _close(layer(x), x.float() @ twin.T, dtype)
    assert calls == ["int8pack", "int8pack", "tiled", "tiled"]


@pytest.mark.parametrize("spec", [QuantSpec("int8"), QuantSpec("int4", 32, True)])
@pytest.mark.parametrize("tied", [False, True])
def test_the_head_option_quantizes_the_lm_head(spec: QuantSpec, tied: bool) -> None:
    float_method = UnquantizedLinearMethod()
    method = make_quant_method(spec, quantize_on_load=True, float_method=float_method, quantize_lm_head=True)
    head = LMHead(64, 96, False, torch.float32, CPU, method)
    assert isinstance(head.quant_method, QuantizedLMHeadMethod)
    weight = _weight(96, 64, seed=2)
    embedding = VocabEmbedding(96, 64, torch.float32, CPU)
    if tied:
        head.tie_to(embedding)
        embedding.weight.data.copy_(weight)
    else:
        head.weight.weight_loader(head.weight, weight)
    head.quant_method.process_weights_after_loading(head)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    _close(head(x), x @ dequantize(spec, *quantize_rtn(spec, weight)).T, torch.float32)
    # A tied head leaves the embedding's float table in place; an untied one drops its float weight.
    assert (getattr(head, "weight", None) is embedding.weight) if tied else not hasattr(head, "weight")
    assert torch.equal(embedding.weight, weight) if tied else True


def test_the_head_stays_float_without_the_option() -> None:
    float_method = UnquantizedLinearMethod()
    head = LMHead(64, 96, False, torch.float32, CPU, make_quant_method(QuantSpec("int8"), quantize_on_load=True,
                                                                          float_method=float_method))
    assert head.quant_method is float_method


def test_a_head_width_the_group_does_not_divide_is_refused() -> None:
    method = make_quant_method(QuantSpec("int4", 64, True), quantize_on_load=True, quantize_lm_head=True)
    with pytest.raises(ConfigError, match="group size 64 does not divide the layer width 96"):
        LMHead(96, 128, False, torch.float32, CPU, method)
