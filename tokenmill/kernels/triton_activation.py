"""Gated activations on a fused [T, 2 * I] gate/up projection: act(gate) * up -> [T, I].

Twins: `reference.silu_and_mul` (SwiGLU) and `reference.gelu_tanh_and_mul` (GeGLU). The activation is computed
in float32 and rounded to the input dtype before the multiply, the rounding order of the twin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SILU, GELU_TANH = 0, 1


@triton.jit
def act_and_mul_kernel(
    gate_up_ptr, out_ptr, intermediate, stride_in, stride_out,
    ACTIVATION: tl.constexpr, BLOCK: tl.constexpr,
):
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    row = gate_up_ptr + token.to(tl.int64) * stride_in
    gate = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + intermediate + cols, mask=mask, other=0.0)
    if ACTIVATION == 0:
        activated = gate / (1.0 + tl.exp(-gate))
    else:
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        # tanh(x) = 1 - 2 / (exp(2x) + 1), stable at both ends in float32.
        activated = 0.5 * gate * (2.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0))
    activated = activated.to(up.dtype).to(tl.float32)
    tl.store(out_ptr + token.to(tl.int64) * stride_out + cols, (activated * up.to(tl.float32)).to(up.dtype), mask=mask)


def launch_config(intermediate: int) -> dict[str, int]:
    block = min(triton.next_power_of_2(intermediate), 1024)
    return {"BLOCK": block, "num_warps": 4 if block >= 512 else 1}


def act_and_mul(gate_up: torch.Tensor, activation: int) -> torch.Tensor:
    gate_up = gate_up if gate_up.stride(-1) == 1 else gate_up.contiguous()
    flat = gate_up.reshape(-1, gate_up.shape[-1])
    intermediate = flat.shape[1] // 2
    out = torch.empty((flat.shape[0], intermediate), dtype=gate_up.dtype, device=gate_up.device)
    if flat.shape[0]:
        config = launch_config(intermediate)
        grid = (flat.shape[0], triton.cdiv(intermediate, config["BLOCK"]))
        act_and_mul_kernel[grid](flat, out, intermediate, flat.stride(0), out.stride(0), ACTIVATION=activation,
                                 BLOCK=config["BLOCK"], num_warps=config["num_warps"])
    return out.view(*gate_up.shape[:-1], intermediate)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return act_and_mul(gate_up, SILU)


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return act_and_mul(gate_up, GELU_TANH)
