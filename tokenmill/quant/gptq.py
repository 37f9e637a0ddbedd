"""GPTQ: quantize a linear layer's columns in order, each rounding error spread over the columns not yet
quantized so the layer's output on calibration inputs moves as little as possible.

With H = 2 X X^T / n (+ damping) and U the upper Cholesky factor of H^-1, quantizing column i with error
e = (w_i - q_i) / U[i, i] is compensated by W[:, j] -= e * U[i, j] for j > i. Columns go in blocks (the
updates of a block's later columns are applied at once, the rest of the matrix once per block); a group's
scale and zero-point are chosen when the group is reached, from its columns as the updates left them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tokenmill.quant.group_quant import dequantize_codes, round_codes, stored_tensors
from tokenmill.quant.weight_quantizer import StoredWeight, WeightQuantizer

DEFAULT_DAMPING = 0.01  # fraction of the mean Hessian diagonal added to it (keeps the Cholesky well posed)
DEFAULT_BLOCK = 128


class InputStatistics:
    """Accumulates X X^T over calibration inputs of one layer: each batch's product in float32 (fast), the
    running sum in float64 (many batches)."""

    def __init__(self, width: int) -> None:
        self.xxt = torch.zeros(width, width, dtype=torch.float64)
        self.count = 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        self.xxt += (x.T @ x).double()
        self.count += x.shape[0]


def output_error(weight: torch.Tensor, approx: torch.Tensor, xxt: torch.Tensor) -> float:
    """sum over calibration tokens of |W x - W' x|^2 = trace(D X X^T D^T), D = W - W'."""
    diff = (weight - approx).float()
    return float(((diff @ xxt.float()) * diff).double().sum())


@dataclass
class GPTQResult:
    stored: StoredWeight
    dequantized: torch.Tensor  # float32 [out, in]
    loss: float  # the layer's output error on the calibration inputs (see output_error)


def _inverse_cholesky(xxt: torch.Tensor, count: int, damping: float,
                      weight: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of the damped H^-1; columns no input ever touched get a unit diagonal and zero
    weight (they cannot change the output)."""
    hessian = (2.0 / max(count, 1)) * xxt.clone()
    dead = torch.diagonal(hessian) == 0
    hessian[dead, dead] = 1.0
    weight[:, dead] = 0.0
    hessian.diagonal().add_(damping * torch.diagonal(hessian).mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
    return torch.linalg.cholesky(inverse, upper=True).float()


def gptq_quantize(quantizer: WeightQuantizer, weight: torch.Tensor, stats: InputStatistics,
                  damping: float = DEFAULT_DAMPING, block_size: int = DEFAULT_BLOCK,
                  act_order: bool = True) -> GPTQResult:
    """`act_order`: quantize columns in order of falling input energy (H's diagonal), the ones that matter most
    first, while later ones can still absorb their errors; groups stay contiguous in the stored layout, so their
    parameters are then chosen up front from the weight ("static groups"). fp8 is one group per row: its codes
    are e4m3 values, rounded against the row's scale like any other grid."""
    spec = quantizer.spec
    original = weight.detach().float()
    out, width = original.shape
    group = spec.group_size or width
    spec.groups(width)  # refuses a group that does not divide the width
    if group < width and block_size % group:
        block_size = group * max(1, block_size // group)  # a block holds whole groups
    order = torch.argsort(torch.diagonal(stats.xxt), descending=True) if act_order else torch.arange(width)
    w = original[:, order].clone()
    u = _inverse_cholesky(stats.xxt[order][:, order], stats.count, damping, w)
    codes = torch.zeros_like(w)
    scales = torch.zeros(out, width // group)
    zeros = torch.zeros(out, width // group)
    static_groups = None
    if act_order:
        for g in range(width // group):  # from the weight as it is, dead columns zeroed
            columns = torch.argsort(order)[g * group:(g + 1) * group]
            scales[:, g], zeros[:, g] = quantizer.block_params(w[:, columns])
        static_groups = order // group
    with _one_thread():
        _quantize_columns(quantizer, w, u, codes, scales, zeros, group, block_size, static_groups)
    codes = codes[:, torch.argsort(order)]
    grouped = (codes.reshape(out, -1, group) - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)
    dequantized = grouped.reshape(out, width)
    loss = output_error(original, dequantized, stats.xxt)
    return GPTQResult(stored_tensors(spec, codes, scales, zeros), dequantized, loss)


@contextmanager
def _one_thread() -> Iterator[None]:
    """The column loop is thousands of small ops: a second intra-op thread only adds synchronisation (and
    on a busy machine, spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _quantize_columns(quantizer: WeightQuantizer, w: torch.Tensor, u: torch.Tensor, codes: torch.Tensor,
                      scales: torch.Tensor, zeros: torch.Tensor, group: int, block_size: int,
                      static_groups: torch.Tensor | None) -> None:
    """The GPTQ sweep: fills codes (and, unless `static_groups` gives each column's group with its parameters
    already chosen, scales and zeros), updating w's not yet quantized columns as it goes.

    It works on transposed copies (a column of W is a contiguous row there), so each column's rounding and its
    rank-1 update of the block's later columns (`addr_`) read and write contiguous memory."""
    spec = quantizer.spec
    width = w.shape[1]
    w_t = w.t().contiguous()  # [in, out]
    scales_t, zeros_t = scales.t().contiguous(), zeros.t().contiguous()  # [groups, out]
    for start in range(0, width, block_size):
        end = min(start + block_size, width)
        block_t = w_t[start:end].clone()
        codes_t = torch.empty_like(block_t)
        errors_t = torch.empty_like(block_t)
        u_block = u[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if static_groups is not None:
                g = int(static_groups[column])
            else:
                g = column // group
                if column % group == 0:  # the group starts here: its parameters from its columns as they are now
                    source = torch.cat([block_t[i:i + group], w_t[end:column + group]])
                    scales_t[g], zeros_t[g] = quantizer.block_params(source.t())
            q = round_codes(spec, block_t[i], scales_t[g], zeros_t[g])
            codes_t[i] = q
            error = (block_t[i] - dequantize_codes(q, scales_t[g], zeros_t[g])) / u_block[i, i]
            block_t[i + 1:].addr_(u_block[i, i + 1:], error, alpha=-1.0)
            errors_t[i] = error
        codes[:, start:end] = codes_t.t()
        w_t[end:].addmm_(u[start:end, end:].t(), errors_t, alpha=-1.0)
    scales.copy_(scales_t.t())
    zeros.copy_(zeros_t.t())
