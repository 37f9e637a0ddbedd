"""The quantized linear method for an engine: from the `quantization` setting and the checkpoint's own
quantization, one method per scheme (int8, int4, w2, fp8), or None for a float model."""

from __future__ import annotations

from typing import Any

from tokenmill.layers.linear import QuantMethod
from tokenmill.quant.checkpoint_spec import checkpoint_quant_spec
from tokenmill.quant.codes import QuantSpec
from tokenmill.quant.fp8 import Fp8LinearMethod
from tokenmill.quant.int4 import Int4LinearMethod
from tokenmill.quant.int8 import Int8LinearMethod
from tokenmill.quant.linear_method import QuantizedLinearMethod
from tokenmill.quant.settings import quantizes_lm_head, resolve_quant_spec
from tokenmill.quant.w2 import W2LinearMethod

METHOD_CLASSES: dict[str, type[QuantizedLinearMethod]] = {
    "int8": Int8LinearMethod,
    "int4": Int4LinearMethod,
    "w2": W2LinearMethod,
    "fp8": Fp8LinearMethod,
}


def make_quant_method(spec: QuantSpec, *, quantize_on_load: bool, float_method: QuantMethod | None = None,
                      use_triton: bool = False, fp8_scaled_mm: bool = False,
                      quantize_lm_head: bool = False, native_bf16: bool = False) -> QuantizedLinearMethod:
    """The method for `spec`; `float_method` serves the layers that stay in float (the LM head, unless
    `quantize_lm_head`). `native_bf16`: the CPU multiplies bfloat16 in hardware (platform.cpu_native_bf16)."""
    method: QuantizedLinearMethod
    if spec.method == "fp8":
        method = Fp8LinearMethod(spec, quantize_on_load=quantize_on_load, float_method=float_method,
                                 use_triton=use_triton, scaled_mm=fp8_scaled_mm)
    else:
        method = METHOD_CLASSES[spec.method](spec, quantize_on_load=quantize_on_load, float_method=float_method,
                                             use_triton=use_triton)
    method.quantize_lm_head = quantize_lm_head
    method.native_bf16 = native_bf16
    return method


def linear_method_for(requested: str | None, checkpoint_config: dict[str, Any], load_format: str,
                      float_method: QuantMethod, *, loader_quantizes: bool = False, use_triton: bool = False,
                      fp8_scaled_mm: bool = False, native_bf16: bool = False) -> QuantMethod:
    """The linear method a model loads with: `float_method` for a float model without a `quantization`
    setting (or with "none"); else the checkpoint's scheme, or `requested` for a float checkpoint.

    A float checkpoint's weights are quantized by the layers as they load, unless `loader_quantizes`: the
    loader then hands canonical tensors for every linear weight itself (a GGUF file repacks or re-quantizes
    its blocks). Random weights (benchmarks) are drawn in float and quantized by the layers. The setting's
    `:head` option quantizes the LM head as well, after loading (quant/lm_head.py)."""
    spec, from_float = resolve_quant_spec(requested, checkpoint_quant_spec(checkpoint_config))
    if spec is None:
        return float_method
    on_load = load_format == "random" or (from_float and not loader_quantizes)
    return make_quant_method(spec, quantize_on_load=on_load, float_method=float_method, use_triton=use_triton,
                             fp8_scaled_mm=fp8_scaled_mm, quantize_lm_head=quantizes_lm_head(requested),
                             native_bf16=native_bf16)
