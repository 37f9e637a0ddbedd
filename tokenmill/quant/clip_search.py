"""Choose a group's scale and zero-point by the layer's OUTPUT error, not the weights': among the quantizer's own
choice (RTN's min/max, or the alternating fit) and the same range clipped by a few ratios, keep per output row the
candidate whose rounding error d (a row of W - Q(W) over the group's columns) moves the outputs least,
d H d^T with H = X^T X of the group's input columns on calibration tokens.

Clipping trades a larger error on the few extreme weights for a finer grid on all the others; which side wins
depends on how much the activations weigh each column, which only H knows. GPTQ uses it for its static group
parameters (H from its Hessian), AWQ for its clipping search (H from the sampled activations), fp8 for its
per-channel scale (the whole row is one group).
"""

from __future__ import annotations

import torch

from tokenmill.quant.group_quant import block_params, dequantize_codes, round_codes
from tokenmill.quant.weight_quantizer import WeightQuantizer

# Fractions of the group's range kept: 1.0 is the quantizer's own range, the others clip both ends.
CLIP_RATIOS = (1.0, 0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.8, 0.75)


def weighted_error(diff: torch.Tensor, xxt: torch.Tensor) -> torch.Tensor:
    """Per row of diff [out, k]: d X^T X d^T, the squared output error summed over the calibration tokens."""
    return ((diff @ xxt) * diff).sum(1)


def search_group_params(quantizer: WeightQuantizer, block: torch.Tensor, xxt: torch.Tensor,
                        ratios: tuple[float, ...] = CLIP_RATIOS) -> tuple[torch.Tensor, torch.Tensor]:
    """block [out, k] (one group's columns), xxt [k, k] -> scales and zeros [out] with the least output error.
    The quantizer's own parameters are always a candidate, so the result is never worse than them on H."""
    spec = quantizer.spec
    block = block.float()
    xxt = xxt.float()
    best_scales, best_zeros = quantizer.block_params(block)
    best_error = weighted_error(block - dequantize_codes(round_codes(spec, block, best_scales, best_zeros),
                                                         best_scales, best_zeros), xxt)
    for ratio in ratios:
        # RTN's parameters for the range shrunk by `ratio` around zero (the zero-point's code stays the same); the
        # codes are still taken from the unclipped weights, which round_codes clamps into the grid.
        scales, zeros = block_params(spec, block * ratio)
        error = weighted_error(block - dequantize_codes(round_codes(spec, block, scales, zeros), scales, zeros), xxt)
        better = error < best_error
        best_scales = torch.where(better, scales, best_scales)
        best_zeros = torch.where(better, zeros, best_zeros)
        best_error = torch.where(better, error, best_error)
    return best_scales, best_zeros
