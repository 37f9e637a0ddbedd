"""Quantize the linear layers of a loaded float model in place, by one algorithm: RTN (or the 2-bit fit) layer by
layer with no data, or GPTQ / AWQ walking the decoder layers in order over calibration windows. Each linear's
weight is replaced by its dequantized value (so later layers see the quantized model's activations) and its
canonical stored tensors are returned for the checkpoint writer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from tokenmill.layers.linear import LinearBase
from tokenmill.layers.norm import OffsetRMSNorm
from tokenmill.quant.awq import (fold_into_norm, fold_into_rows, quantize_with_clip_search, scale_columns,
                                 scaled_output_error, search_scales, tie_heads, value_row_scales)
from tokenmill.quant.codes import dequantize
from tokenmill.quant.gptq import InputStatistics, gptq_quantize, output_error
from tokenmill.quant.weight_quantizer import StoredWeight, WeightQuantizer
from tokenmill.tools.layer_walk import LayerWalk, quantizable_linears

# Activation rows AWQ's search scores each alpha on, sampled evenly from the batches: its cost is one matmul of
# these rows per alpha and linear layer, so it is capped. The scales themselves (mean |x| per channel) come
# from every calibration token.
AWQ_SEARCH_ROWS = 512
Log = Callable[[str], None]


@dataclass
class QuantizedLayers:
    stored: dict[str, StoredWeight] = field(default_factory=dict)  # model module name -> canonical tensors
    loss: float = 0.0  # calibration output error of the chosen algorithm, summed over layers
    rtn_loss: float = 0.0  # RTN's on the same inputs (for comparison)


def _set_weight(module: LinearBase, quantizer: WeightQuantizer, stored: StoredWeight) -> None:
    module.weight.data.copy_(dequantize(quantizer.spec, *stored).to(module.weight.dtype))


def quantize_without_data(model: nn.Module, quantizer: WeightQuantizer, log: Log) -> QuantizedLayers:
    """RTN or the alternating fit: each linear layer from its weight alone."""
    result = QuantizedLayers()
    for index, layer in enumerate(model.model.layers):
        for name, module in quantizable_linears(layer).items():
            stored = quantizer.quantize(module.weight.detach().float())
            _set_weight(module, quantizer, stored)
            result.stored[f"model.layers.{index}.{name}"] = stored
        log(f"layer {index + 1}/{len(model.model.layers)} quantized")
    return result


def quantize_gptq_layers(model: nn.Module, quantizer: WeightQuantizer, walk: LayerWalk, log: Log) -> QuantizedLayers:
    result = QuantizedLayers()
    for index, layer in enumerate(walk.layers):
        linears = quantizable_linears(layer)
        stats = {name: InputStatistics(module.input_size) for name, module in linears.items()}
        walk.collect(index, lambda name, x: stats[name].add(x))
        layer_loss = layer_rtn = 0.0
        for name, module in linears.items():
            weight = module.weight.detach().float()
            gptq = gptq_quantize(quantizer, weight, stats[name])
            layer_loss += gptq.loss
            layer_rtn += output_error(weight, quantizer.fake(weight), stats[name].xxt)
            module.weight.data.copy_(gptq.dequantized.to(module.weight.dtype))
            result.stored[f"model.layers.{index}.{name}"] = gptq.stored
        walk.advance(index)
        result.loss += layer_loss
        result.rtn_loss += layer_rtn
        log(f"layer {index + 1}/{len(walk.layers)}: GPTQ output error {layer_loss:.4g} (RTN {layer_rtn:.4g})")
    return result


def _sample_rows(x: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    rows = x.detach().reshape(-1, x.shape[-1])
    if rows.shape[0] > count:
        rows = rows[torch.randperm(rows.shape[0], generator=generator)[:count]]
    return rows.float().clone()


def awq_folds(layer: nn.Module) -> list[tuple[str, Callable[[torch.Tensor], None], Callable | None]]:
    """(linear name, how to divide its input by s upstream, channel tie) for every linear whose input can be
    scaled exactly in this layer: q/k/v after the input norm, gate/up after the MLP's norm, down after up's rows,
    o_proj after v's rows."""
    folds: list[tuple[str, Callable[[torch.Tensor], None], Callable | None]] = []
    attn, mlp = layer.self_attn, getattr(layer, "mlp", None)

    def into_norm(norm: nn.Module) -> Callable[[torch.Tensor], None]:
        offset = 1.0 if isinstance(norm, OffsetRMSNorm) else 0.0
        return lambda s: fold_into_norm(norm.weight.data, s, offset)

    def into_shard(linear: LinearBase, shard: str, map_scales: Callable = lambda s: s) -> Callable:
        offset, size = linear.shards[shard]
        bias = linear.bias.data if linear.bias is not None else None
        return lambda s: fold_into_rows(linear.weight.data, slice(offset, offset + size), map_scales(s), bias)

    folds.append(("self_attn.qkv_proj", into_norm(layer.input_layernorm), None))
    heads, kv_heads, head_dim = attn.heads, attn.kv_heads, attn.head_dim
    folds.append(("self_attn.o_proj",
                  into_shard(attn.qkv_proj, "v", lambda s: value_row_scales(s, heads, kv_heads, head_dim)),
                  tie_heads(heads, kv_heads, head_dim)))
    if mlp is not None and hasattr(mlp, "gate_up_proj"):  # the dense gated MLP (MoE experts stay float)
        mlp_norm = getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm
        folds.append(("mlp.gate_up_proj", into_norm(mlp_norm), None))
        folds.append(("mlp.down_proj", into_shard(mlp.gate_up_proj, "up"), None))
    return folds


def quantize_awq_layers(model: nn.Module, quantizer: WeightQuantizer, walk: LayerWalk, log: Log) -> QuantizedLayers:
    result = QuantizedLayers()
    generator = torch.Generator().manual_seed(0)
    # The search rounds with RTN even when the final codes come from the 2-bit fit: the fit at each of the
    # grid's alphas would cost twenty fits per layer, and the scales it favours are the same in kind.
    search_quantizer = WeightQuantizer(quantizer.spec)
    per_batch = max(1, AWQ_SEARCH_ROWS // len(walk.batches))
    for index, layer in enumerate(walk.layers):
        linears = quantizable_linears(layer)
        inputs: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
        magnitude = {name: torch.zeros(module.input_size) for name, module in linears.items()}

        def keep(name: str, x: torch.Tensor) -> None:
            inputs[name].append(_sample_rows(x, per_batch, generator))
            magnitude[name] += x.detach().float().abs().reshape(-1, x.shape[-1]).sum(0) / walk.num_tokens

        walk.collect(index, keep)
        searches = {}
        for name, fold, tie in awq_folds(layer):
            if name in linears:
                x = torch.cat(inputs[name])
                found = search_scales(search_quantizer, linears[name].weight, x, tie=tie, magnitude=magnitude[name])
                if search_quantizer != quantizer:  # the baseline: the codes actually written, with no scales
                    found.rtn_loss = scaled_output_error(quantizer, linears[name].weight, x,
                                                         torch.ones_like(found.scales))
                searches[name] = (found, fold)
        # Fold every scale first (the float layer is unchanged by them), then quantize the scaled weights.
        for name, (search, fold) in searches.items():
            fold(search.scales)
            scale_columns(linears[name].weight.data, search.scales)
        layer_loss = layer_rtn = 0.0
        for name, module in linears.items():
            x = torch.cat(inputs[name])
            if name in searches:
                x = x / searches[name][0].scales
                layer_rtn += searches[name][0].rtn_loss
            else:
                layer_rtn += scaled_output_error(quantizer, module.weight, x, torch.ones(module.input_size))
            stored, loss = quantize_with_clip_search(quantizer, module.weight, x)
            layer_loss += loss
            _set_weight(module, quantizer, stored)
            result.stored[f"model.layers.{index}.{name}"] = stored
        walk.advance(index)
        result.loss += layer_loss
        result.rtn_loss += layer_rtn
        alphas = ", ".join(f"{n.rsplit('.', 1)[-1]} {s.alpha:.2f}" for n, (s, _) in searches.items())
        log(f"layer {index + 1}/{len(walk.layers)}: AWQ output error {layer_loss:.4g} (RTN {layer_rtn:.4g}); "
            f"alpha {alphas}")
    return result
