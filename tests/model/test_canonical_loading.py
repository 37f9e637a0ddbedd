"""Canonical tensors through the real weight filler: a model whose linear layers hold canonical parameters
(a torch twin of a quantized method, defined here: qweight / scales / qzeros, dequantize-then-matmul) loads
GGUF and GPTQ checkpoints through the packed-module map (fused q/k/v and gate/up as row shards), and every
layer then stands for exactly the weight the dequantized load gives. The real methods are h-qmeth's; this
twin only fixes the parameter names and shapes of quant/codes.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.checkpoints import make_checkpoint
from tests.quant_checkpoints import expected_weight, gptq_tensors, random_layer, write_quantized_checkpoint
from tokenmill.layers.linear import LinearBase, LMHead, QuantMethod, UnquantizedLinearMethod
from tokenmill.models.loader import checkpoint_config_dict, load_model
from tokenmill.quant.checkpoint_spec import checkpoint_quant_spec
from tokenmill.quant.codes import QuantSpec, dequantize

pytest.importorskip("gguf")
from tests.gguf_files import make_gguf  # noqa: E402


class CanonicalTwin(QuantMethod):
    """Canonical parameters on every linear layer but the LM head (which stays float, as the loaders keep it)."""

    def __init__(self, spec: QuantSpec) -> None:
        self.spec = spec
        self.plain = UnquantizedLinearMethod()

    def create_weights(self, layer: LinearBase, dtype: torch.dtype, device: torch.device) -> None:
        if isinstance(layer, LMHead):
            return self.plain.create_weights(layer, dtype, device)
        spec, out, width = self.spec, layer.output_size, layer.input_size
        layer.qweight = _param(torch.empty(spec.qweight_shape(out, width), dtype=spec.qweight_dtype()), layer)
        layer.scales = _param(torch.empty(out, spec.groups(width)), layer)
        layer.qzeros = _param(torch.empty(out, spec.groups(width)), layer) if spec.method in ("int4", "w2") else None
        layer.bias = _param(torch.empty(out, dtype=dtype), layer) if layer.has_bias else None

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        if isinstance(layer, LMHead):
            return self.plain.apply(layer, x)
        return F.linear(x, self.weight(layer).to(x.dtype), layer.bias)

    def weight(self, layer: LinearBase) -> torch.Tensor:
        return dequantize(self.spec, layer.qweight, layer.scales, layer.qzeros)


def _param(tensor: torch.Tensor, layer: LinearBase) -> torch.nn.Parameter:
    param = torch.nn.Parameter(tensor, requires_grad=False)
    param.weight_loader = layer.weight_loader  # type: ignore[attr-defined]
    return param


def _assert_layers_equal(path: Path, spec: QuantSpec) -> None:
    twin = CanonicalTwin(spec)
    quantized, _ = load_model(path, dtype="float32", quant=twin)
    dequantized, _ = load_model(path, dtype="float32")
    floats = dict(dequantized.named_modules())
    checked = 0
    for name, module in quantized.named_modules():
        if isinstance(module, LinearBase) and not isinstance(module, LMHead):
            assert module.qweight.dtype == spec.qweight_dtype()
            assert torch.equal(twin.weight(module), floats[name].weight), name
            checked += 1
    assert checked == 2 * 4  # qkv, o, gate_up, down in each of 2 layers
    assert torch.equal(quantized.lm_head.weight, dequantized.lm_head.weight)


@pytest.mark.parametrize("tensor_type", ["Q8_0", "Q4_0"])
def test_gguf_llama_layers_load_canonical_through_the_fused_shards(tmp_path, tensor_type):
    path = make_gguf("llama", tmp_path, tensor_type=tensor_type, tokenizer="llama")  # q/k rows permuted
    spec = checkpoint_quant_spec(checkpoint_config_dict(path))
    _assert_layers_equal(path, spec)


def test_gptq_llama_layers_load_canonical_through_the_fused_shards(tmp_path):
    source = make_checkpoint("llama", tmp_path / "float")

    def layer_tensors(name, out, width, rng):
        layer = random_layer(out, width, 32, 4, rng, symmetric=False)
        return gptq_tensors(layer, 4, 32), expected_weight(layer)

    entry = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False}
    quantized, _ = write_quantized_checkpoint(source, tmp_path, entry, layer_tensors)
    _assert_layers_equal(quantized, QuantSpec("int4", 32, True))
