"""RMSNorm with the residual add fused in, and Gemma's (1 + weight) variant.

Twins: `reference.rms_norm`, `add_rms_norm`, `offset_rms_norm`, `add_offset_rms_norm`. One program per row:
the sum x + residual is rounded to the input dtype (it is the next residual), normalised in float32, and scaled
in the twin's order of rounding: cast then scale by weight (Llama), or scale by (1 + weight) then cast (Gemma).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    hidden, eps, stride_x, stride_residual, stride_out, stride_residual_out,
    HAS_RESIDUAL: tl.constexpr, OFFSET: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + row * stride_residual_out + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    normed = x32 * tl.rsqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if OFFSET:
        out = normed * (1.0 + weight)
    else:
        out = weight * normed.to(x.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def launch_config(hidden: int) -> dict[str, int]:
    block = triton.next_power_of_2(hidden)
    return {"BLOCK": block, "num_warps": min(max(block // 256, 1), 16)}


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.reshape(-1, t.shape[-1])


def fused_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                   offset: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual), or (norm(x), x) without a residual. `offset`: Gemma's (1 + weight).
    The output has the weight's dtype (as the twin's weight * x), which equals x's in every model here."""
    rows = _rows(x)
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype) if not offset else x.dtype,
                      device=x.device)
    summed = torch.empty_like(rows) if residual is not None else rows
    residual_rows = _rows(residual) if residual is not None else rows
    if rows.shape[0]:
        config = launch_config(rows.shape[1])
        rms_norm_kernel[(rows.shape[0],)](
            rows, residual_rows, weight, out, summed, rows.shape[1], eps,
            rows.stride(0), residual_rows.stride(0), out.stride(0), summed.stride(0),
            HAS_RESIDUAL=residual is not None, OFFSET=offset, BLOCK=config["BLOCK"], num_warps=config["num_warps"],
        )
    return out.view(x.shape), summed.view(x.shape) if residual is not None else x
