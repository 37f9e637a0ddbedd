"""CPU matmuls of quantized weights: PyTorch's packed kernels where they exist, a tiled dequantizing matmul
elsewhere. Each takes or builds its own layout from the canonical tensors (quant/codes.py).

- int8 per output channel: `aten._weight_int8pack_mm(x, int8 [N, K], scales [N])` computes
  x @ (codes * scales).T with scales in x's dtype; it reads the int8 codes directly (a quarter of float32's
  bytes), which is what decode on a CPU is bound by.
- int4: `aten._convert_weight_to_int4pack_for_cpu(codes int32 [N, K], 1)` packs codes 0..15 into its own
  uint8 [N, K / 2] order, and `aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)`
  computes x @ W.T with W = (code - 8) * scale + zero, where scales_and_zeros is [K / group, N, 2] in x's
  dtype. Our W = (code - qzero) * scale, so its `zero` is (8 - qzero) * scale. It takes group sizes 32, 64,
  128 and 256 and N a multiple of 16 (checked by `int4pack_supported`).
- everything else (2-bit, grouped int8, fp8, int4 shapes the packed kernel refuses, and many rows):
  `tiled_dequant_matmul` walks K in tiles of whole groups, dequantizes one [N, tile] slab and accumulates
  x[:, tile] @ slab.T, so the float weight never exists whole (a slab is N x 256 values or one group).
"""

from __future__ import annotations

import torch

from tokenmill.quant.codes import unpack_codes

INT4PACK_GROUP_SIZES = (32, 64, 128, 256)
_TILE_COLUMNS = 256  # a slab of N x 256 floats: 1.5 MB at N = 1536 in float32, inside a core's L2


def int8pack_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (codes [N, K] int8 * scales [N]).T -> [M, N]; scales already in x's dtype."""
    return torch.ops.aten._weight_int8pack_mm(x, codes, scales)


def int4pack_supported(out_features: int, group_size: int | None) -> bool:
    return group_size in INT4PACK_GROUP_SIZES and out_features % 16 == 0


def int4pack_weight(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical int4 tensors -> (the kernel's packed codes, its scales_and_zeros [K / group, N, 2] in dtype)."""
    codes = unpack_codes(qweight, 4).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    zeros = (8.0 - qzeros.float()) * scales.float()  # (code - qzero) * s = (code - 8) * s + (8 - qzero) * s
    scales_and_zeros = torch.stack([scales.float().t(), zeros.t()], dim=-1).to(dtype).contiguous()
    return packed, scales_and_zeros


def int4pack_matmul(x: torch.Tensor, packed: torch.Tensor, group_size: int,
                    scales_and_zeros: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)


def tiled_dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
                         bits: int) -> torch.Tensor:
    """x [M, K] @ W.T for canonical codes (packed along K when bits < 8; int8 or fp8 codes otherwise), without
    materializing W whole. One opaque op under torch.compile: inductor's freezing would otherwise fold the
    dequantization of the (constant) codes into a float weight, giving back the memory quantization saves."""
    return _tiled_dequant_matmul_op(x, qweight, scales, qzeros, bits)


@torch.library.custom_op("tokenmill::tiled_dequant_matmul", mutates_args=())
def _tiled_dequant_matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                             qzeros: torch.Tensor | None, bits: int) -> torch.Tensor:
    # Slabs and sums are float32 whatever x's dtype: one rounding at the end, as the float32 twin has, rather
    # than one per tile (a bfloat16 CPU matmul gains nothing without AMX anyway).
    width = x.shape[1]
    x32 = x.float()
    out = torch.zeros(x.shape[0], qweight.shape[0], dtype=torch.float32, device=x.device)
    groups = scales.shape[1]
    group = width // groups
    per_byte = 8 // bits if bits < 8 else 1
    # Whole groups per tile; with one scale per row (groups == 1) any tile of columns shares it.
    tile = _TILE_COLUMNS if groups == 1 else max(group, _TILE_COLUMNS // group * group)
    for start in range(0, width, tile):
        stop = min(start + tile, width)
        packed = qweight[:, start // per_byte: stop // per_byte]
        codes = (unpack_codes(packed, bits) if bits < 8 else packed).float()
        g0, g1 = (0, 1) if groups == 1 else (start // group, stop // group)
        slab = codes.view(codes.shape[0], g1 - g0, -1)
        if qzeros is not None:
            slab = slab - qzeros[:, g0:g1, None]
        slab = (slab * scales[:, g0:g1, None]).view(codes.shape[0], stop - start)
        out.addmm_(x32[:, start:stop], slab.t())
    return out.to(x.dtype)


@_tiled_dequant_matmul_op.register_fake
def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
      bits: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], qweight.shape[0])
