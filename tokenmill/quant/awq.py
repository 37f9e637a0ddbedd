"""AWQ: activation-aware per-input-channel scales. Channels that carry large activations matter most, so the
weights' columns are scaled up by s = mean|x|^alpha before rounding (their relative rounding error shrinks) and
the activations are scaled down by 1/s, folded into the layer that produces them (the preceding norm's weight,
or the rows of the preceding linear layer), so the float model computes exactly the same function. alpha is
chosen on a grid to minimise the layer's output error on calibration inputs; alpha = 0 is plain RTN. The second
half of AWQ, the clipping search, then picks each group's range (quant/clip_search.py) on the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tokenmill.quant.clip_search import search_group_params
from tokenmill.quant.group_quant import round_codes, stored_tensors
from tokenmill.quant.weight_quantizer import StoredWeight, WeightQuantizer

DEFAULT_GRID = 20  # alphas 0, 1/20, ..., 19/20


@dataclass
class ScaleSearch:
    scales: torch.Tensor  # [in]: multiply the weight's columns, divide the inputs
    alpha: float
    loss: float  # output error |X W^T - X W'^T|^2 at the chosen alpha
    rtn_loss: float  # the same at alpha = 0 (plain RTN)


def scaled_output_error(quantizer: WeightQuantizer, weight: torch.Tensor, inputs: torch.Tensor,
                        scales: torch.Tensor) -> float:
    """|X W^T - X (Q(W diag s) diag 1/s)^T|^2: the output error of quantizing with input scales s."""
    w = weight.detach().float()
    x = inputs.detach().float().reshape(-1, w.shape[1])
    approx = quantizer.fake(w * scales) / scales
    return float((x @ (approx - w).T).square().sum())


def search_scales(quantizer: WeightQuantizer, weight: torch.Tensor, inputs: torch.Tensor,
                  grid: int = DEFAULT_GRID, tie: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  magnitude: torch.Tensor | None = None) -> ScaleSearch:
    """weight [out, in], inputs [n, in] -> the best per-channel scales. `magnitude`: mean |x| per channel when
    known from more tokens than `inputs` (which only score the alphas); by default, the inputs'. `tie` maps the
    magnitudes to values shared by channels that must scale together (GQA: query heads sharing a value head)."""
    w = weight.detach().float()
    x = inputs.detach().float().reshape(-1, w.shape[1])
    magnitude = (x.abs().mean(0) if magnitude is None else magnitude.float()).clamp(min=1e-8)
    if tie is not None:
        magnitude = tie(magnitude)
    best: ScaleSearch | None = None
    rtn_loss = 0.0
    for step in range(grid):
        alpha = step / grid
        scales = magnitude.pow(alpha)
        scales = scales / (scales.max() * scales.min()).sqrt()  # centred around 1, as the weights' range is
        loss = scaled_output_error(quantizer, w, x, scales)
        if step == 0:
            rtn_loss = loss
        if best is None or loss < best.loss:
            best = ScaleSearch(scales, alpha, loss, 0.0)
    assert best is not None
    best.rtn_loss = rtn_loss
    return best


def quantize_with_clip_search(quantizer: WeightQuantizer, weight: torch.Tensor,
                              inputs: torch.Tensor) -> tuple[StoredWeight, float]:
    """weight [out, in] (already scaled), inputs [n, in] (already divided by the scales) -> the stored weight whose
    groups each take the range with the least output error on these inputs, and that error |X W^T - X W'^T|^2."""
    spec = quantizer.spec
    w = weight.detach().float()
    x = inputs.detach().float().reshape(-1, w.shape[1])
    xxt = x.T @ x
    group = spec.group_size or w.shape[1]
    codes, scales, zeros = [], [], []
    for start in range(0, w.shape[1], group):
        block = w[:, start:start + group]
        block_scales, block_zeros = search_group_params(quantizer, block, xxt[start:start + group, start:start + group])
        codes.append(round_codes(spec, block, block_scales, block_zeros))
        scales.append(block_scales)
        zeros.append(block_zeros)
    scales_t, zeros_t = torch.stack(scales, 1), torch.stack(zeros, 1)
    grouped = (torch.cat(codes, 1).reshape(w.shape[0], -1, group) - zeros_t.unsqueeze(-1)) * scales_t.unsqueeze(-1)
    loss = float((x @ (grouped.reshape(w.shape) - w).T).square().sum())
    return stored_tensors(spec, torch.cat(codes, 1), scales_t, zeros_t), loss


def fold_into_norm(norm_weight: torch.Tensor, scales: torch.Tensor, offset: float = 0.0) -> None:
    """Divide a norm's output by `scales` in place. `offset`: the norm multiplies by (offset + weight) (Gemma: 1)."""
    norm_weight.copy_(((norm_weight.float() + offset) / scales - offset).to(norm_weight.dtype))


def fold_into_rows(weight: torch.Tensor, rows: slice, scales: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Divide the outputs `rows` of a linear layer by `scales` in place (the producer of the next layer's input)."""
    weight[rows].copy_((weight[rows].float() / scales.unsqueeze(1)).to(weight.dtype))
    if bias is not None:
        bias[rows].copy_((bias[rows].float() / scales).to(bias.dtype))


def scale_columns(weight: torch.Tensor, scales: torch.Tensor) -> None:
    """Multiply a linear layer's input columns by `scales` in place (the consumer's side of the fold)."""
    weight.copy_((weight.float() * scales).to(weight.dtype))


def tie_heads(num_heads: int, num_kv_heads: int, head_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """For o_proj's input (attention output, heads x head_dim): channel d of every query head reading one value
    head comes from the same value row, so those channels share one scale (their mean magnitude)."""
    per_kv = num_heads // num_kv_heads

    def tie(magnitude: torch.Tensor) -> torch.Tensor:
        shared = magnitude.reshape(num_kv_heads, per_kv, head_dim).mean(1, keepdim=True)
        return shared.expand(num_kv_heads, per_kv, head_dim).reshape(-1)

    return tie


def value_row_scales(scales: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """o_proj's tied input scales [heads * head_dim] -> the value rows' scales [kv_heads * head_dim]."""
    return scales.reshape(num_kv_heads, num_heads // num_kv_heads, head_dim)[:, 0].reshape(-1)
