"""The CPU kernel paths of the weight-only methods, each against its dequantized twin: the tiled float32 slabs
(several slabs and a partial one), the switch from aten's int8 kernel to the slabs at
INT8_DEQUANT_GEMM_MIN_ROWS rows (to the bfloat16 GEMM at INT8_BF16_GEMM_MIN_ROWS where bfloat16 is native),
and the LM head quantized with the `:head` option."""

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


def _int8_layer(weight: torch.Tensor, dtype: torch.dtype, native_bf16: bool = False) -> ReplicatedLinear:
    layer = ReplicatedLinear(weight.shape[1], weight.shape[0], False, dtype, CPU,
                             make_quant_method(QuantSpec("int8"), quantize_on_load=True, native_bf16=native_bf16))
    layer.weight.weight_loader(layer.weight, weight)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize(("dtype", "native_bf16", "threshold", "kernels"), [
    (torch.float32, False, 128, ["tiled"] * 4), (torch.float32, True, 128, ["tiled"] * 4),
    (torch.bfloat16, False, 128, ["int8pack", "int8pack", "tiled", "tiled"]),
    (torch.bfloat16, True, 8, ["int8pack", "int8pack", "bf16_gemm", "bf16_gemm"])])
def test_int8_switches_kernels_at_the_documented_row_count(dtype: torch.dtype, native_bf16: bool, threshold: int,
                                                          kernels: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    packed, tiled, bf16_gemm = int8.int8pack_matmul, int8.tiled_dequant_matmul, int8.int8_bf16_gemm
    monkeypatch.setattr(int8, "int8pack_matmul", lambda *a: calls.append("int8pack") or packed(*a))
    monkeypatch.setattr(int8, "tiled_dequant_matmul", lambda *a: calls.append("tiled") or tiled(*a))
    monkeypatch.setattr(int8, "int8_bf16_gemm", lambda *a: calls.append("bf16_gemm") or bf16_gemm(*a))
    weight = _weight(48, 64)
    layer = _int8_layer(weight, dtype, native_bf16)
    twin = dequantize(QuantSpec("int8"), *quantize_rtn(QuantSpec("int8"), weight))
    assert threshold == (cpu_kernels.INT8_BF16_GEMM_MIN_ROWS if native_bf16 and dtype == torch.bfloat16
                         else cpu_kernels.INT8_DEQUANT_GEMM_MIN_ROWS)
    for rows in (1, threshold - 1, threshold, 3 * threshold):
        x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)).to(dtype)
        _close(layer(x), x.float() @ twin.T, dtype)
    assert calls == kernels


@pytest.mark.parametrize(("dtype", "packed"), [(torch.bfloat16, True), (torch.float32, False)])
def test_int4_uses_the_packed_kernel_with_bfloat16_activations_only(dtype: torch.dtype, packed: bool) -> None:
    weight = _weight(48, 64, seed=5)
    spec = QuantSpec("int4", 32, True)
    layer = ReplicatedLinear(64, 48, False, dtype, CPU, make_quant_method(spec, quantize_on_load=True))
    layer.weight.weight_loader(layer.weight, weight)
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.int4pack is packed
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(6)).to(dtype)
    _close(layer(x), x.float() @ dequantize(spec, *quantize_rtn(spec, weight)).T, dtype)


def test_the_bfloat16_gemm_walks_slabs_of_a_large_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels, "_BF16_SLAB_VALUES", 16 * 64)  # 16-row slabs: 40 rows are 16 + 16 + 8
    weight = _weight(40, 64, seed=3)
    codes, scales, _ = quantize_rtn(QuantSpec("int8"), weight)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(4)).bfloat16()
    got = cpu_kernels.int8_bf16_gemm(x, codes, scales[:, 0].bfloat16())
    _close(got, x.float() @ dequantize(QuantSpec("int8"), codes, scales, None).T, torch.bfloat16)
    assert got.is_contiguous()  # as the fake kernel promises torch.compile
    torch.library.opcheck(cpu_kernels._int8_bf16_gemm_op, (x, codes, scales[:, 0].bfloat16()))


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
