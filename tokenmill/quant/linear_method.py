"""The part every weight-quantized linear method shares: the canonical parameters and how they are filled.

A layer is filled one of two ways:
- from a quantized checkpoint: `qweight`, `scales` (and `qzeros` for int4 / w2) are parameters in the
  canonical layout (quant/codes.py), loaded by name; fused layers take each shard's rows, as for floats;
- quantized on load: the layer shows the loader a float `weight` of its usual shape that holds no memory
  (meta); its loader quantizes each checkpoint tensor (a whole weight or one fused shard) as it arrives and
  writes the codes into the canonical tensors' rows. Rows are quantized independently, so a shard quantizes
  alone, and no float copy of the model is ever held.

After loading, `process_weights_after_loading` hands the canonical tensors to the method's `prepare`, which
turns them into its kernel's layout; `apply` runs the kernel. The LM head stays in float (`for_layer`) unless
the setting's `:head` asks for it quantized too (quant/lm_head.py).
"""

from __future__ import annotations

from abc import abstractmethod
from functools import partial

import torch
from torch import nn

from tokenmill.errors import ConfigError, ModelLoadError
from tokenmill.layers.linear import LinearBase, QuantMethod, UnquantizedLinearMethod
from tokenmill.quant.codes import QuantSpec, quantize_rtn
from tokenmill.quant.lm_head import QuantizedLMHeadMethod

CANONICAL = ("qweight", "scales", "qzeros")


class QuantizedLinearMethod(QuantMethod):
    """Base of the weight-only methods; subclasses implement `prepare` (repack) and `matmul`."""

    def __init__(self, spec: QuantSpec, *, quantize_on_load: bool, float_method: QuantMethod | None = None,
                 use_triton: bool = False, quantize_lm_head: bool = False) -> None:
        self.spec = spec
        self.quantize_lm_head = quantize_lm_head  # the `:head` option: the LM head too (quant/lm_head.py)
        self.quantize_on_load = quantize_on_load
        self.use_triton = use_triton  # on CUDA: the Triton kernels (else their torch twins); platform decides
        self.native_bf16 = False  # the CPU multiplies bfloat16 in hardware (set by make_quant_method)
        # The LM head's method: the float one the model would have used without quantization.
        self.float_method = float_method or UnquantizedLinearMethod()

    def for_layer(self, layer: LinearBase) -> QuantMethod:
        if not layer.keeps_float_weights:
            return self
        return QuantizedLMHeadMethod(self, self.float_method) if self.quantize_lm_head else self.float_method

    def create_weights(self, layer: LinearBase, dtype: torch.dtype, device: torch.device) -> None:
        spec, out = self.spec, layer.output_size
        try:
            rows, cols = spec.qweight_shape(out, layer.input_size)  # ConfigError when the group does not divide
        except ConfigError as exc:
            raise ConfigError(exc.setting, f"{exc.message}{_group_hint(layer.input_size)}") from exc
        groups = spec.groups(layer.input_size)
        tensors = {"qweight": torch.empty(rows, cols, dtype=spec.qweight_dtype(), device=device),
                   "scales": torch.empty(out, groups, dtype=torch.float32, device=device)}
        if spec.has_qzeros:
            tensors["qzeros"] = torch.empty(out, groups, dtype=torch.float32, device=device)
        if self.quantize_on_load:
            for name, tensor in tensors.items():
                layer.register_buffer(name, tensor, persistent=False)
            placeholder = torch.empty(out, layer.input_size, dtype=dtype, device="meta")
            layer.weight = _parameter(placeholder, partial(self._quantize_into, layer))
        else:
            for name, tensor in tensors.items():
                setattr(layer, name, _parameter(tensor, partial(self._load_canonical, layer, name)))
        layer.bias = _parameter(torch.empty(out, dtype=dtype, device=device), layer.weight_loader) \
            if layer.has_bias else None
        layer.compute_dtype = dtype

    def _quantize_into(self, layer: LinearBase, param: nn.Parameter, loaded: torch.Tensor,
                       shard: str | None = None) -> None:
        """The float weight's loader: quantize this tensor (the whole weight or one shard's rows) with RTN."""
        # The float shape is checked here, in the float weight's terms; the canonical tensors' own checks below
        # would report packed widths. An unknown shard is left to LinearBase.weight_loader, which names them.
        rows = layer.output_size if shard is None else layer.shards.get(shard, (0, loaded.shape[0]))[1]
        if tuple(loaded.shape) != (rows, layer.input_size):
            raise ModelLoadError(f"shape {tuple(loaded.shape)} does not fit {(rows, layer.input_size)}")
        quantized = quantize_rtn(self.spec, loaded.to(layer.qweight.device))
        for name, value in zip(CANONICAL, quantized):
            if value is not None:
                layer.weight_loader(getattr(layer, name), value, shard)  # the rows of `shard`; checks the rows

    def _load_canonical(self, layer: LinearBase, name: str, param: nn.Parameter, loaded: torch.Tensor,
                        shard: str | None = None) -> None:
        """A quantized checkpoint's tensor: its dtype must be the canonical one (a float tensor where codes
        belong would be cast silently into nonsense), its shape that of the layer's rows."""
        want = param.dtype if name == "qweight" else None
        if want is not None and loaded.dtype != want:
            raise ModelLoadError(f"{name} of a {self.spec.method} layer must be {want}, got {loaded.dtype}")
        if name != "qweight" and not loaded.dtype.is_floating_point:
            raise ModelLoadError(f"{name} must be a float tensor, got {loaded.dtype}")
        try:
            layer.weight_loader(param, loaded, shard)
        except ModelLoadError as exc:
            layout = f"[out, in / {self.spec.codes_per_byte}]" if name == "qweight" else "[out, in / group_size]"
            raise ModelLoadError(f"{name} {exc} ({self.spec.method} {name} is {layout}, in = {layer.input_size}, "
                                 f"group_size = {self.spec.group_size})") from exc

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        if self.quantize_on_load:
            del layer.weight  # the meta placeholder the loader wrote through
        canonical = [getattr(layer, name, None) for name in CANONICAL]
        for name, tensor in zip(CANONICAL, canonical):
            if tensor is not None:
                delattr(layer, name)
        qweight, scales, qzeros = (None if t is None else t.detach() for t in canonical)
        assert qweight is not None and scales is not None
        self.prepare(layer, qweight, scales, qzeros)

    @abstractmethod
    def prepare(self, layer: LinearBase, qweight: torch.Tensor, scales: torch.Tensor,
                qzeros: torch.Tensor | None) -> None:
        """Turn the canonical tensors into the kernel's layout (set_kernel_tensors), keeping only what `matmul`
        reads; the codes keep the name `qweight` in every layout."""

    @abstractmethod
    def matmul(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        """x [M, input_size] (contiguous, the model dtype) -> [M, output_size], without the bias."""

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, layer.input_size).contiguous()
        out = self.matmul(layer, flat)
        if layer.bias is not None:
            out = out + layer.bias
        return out.reshape(*x.shape[:-1], layer.output_size)


def _group_hint(width: int) -> str:
    """The largest usual group size (a power of two, 32 to 256) that divides `width`, as a suggestion."""
    fits = [g for g in (256, 128, 64, 32) if width % g == 0]
    return f" (a group size that divides it: {fits[0]})" if fits else ""


def set_kernel_tensors(layer: nn.Module, **tensors: torch.Tensor | None) -> None:
    """Register a layer's kernel-layout tensors as frozen parameters (None: absent, read as None): they
    follow .to(), and whatever counts a model's weights by its parameters (the bench's roofline) counts them
    at their real storage size."""
    for name, tensor in tensors.items():
        layer.register_parameter(name, None if tensor is None else nn.Parameter(tensor, requires_grad=False))


def _parameter(tensor: torch.Tensor, loader: object) -> nn.Parameter:
    param = nn.Parameter(tensor, requires_grad=False)
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param
