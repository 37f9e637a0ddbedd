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
- int8 per output channel with bfloat16 activations on a CPU that multiplies bfloat16 natively, from
  INT8_BF16_GEMM_MIN_ROWS rows: `int8_bf16_gemm` converts slabs of codes to bfloat16 (exact: |code| <= 128)
  and runs oneDNN's bfloat16 GEMM, then scales the output columns.
- everything else (2-bit, grouped int8, fp8, int4 shapes the packed kernel refuses, and int8 per channel from
  INT8_DEQUANT_GEMM_MIN_ROWS rows): `tiled_dequant_matmul` walks the output channels in slabs of whole rows,
  dequantizes one [rows, K] slab in float32 (about 1 MB) and writes x @ slab.T into those output columns, so
  the float weight never exists whole.
"""

from __future__ import annotations

import torch

from tokenmill.quant.codes import unpack_codes

INT4PACK_GROUP_SIZES = (32, 64, 128, 256)
# From this many rows (a prefill chunk, a large batch) int8 weights go through float32 slabs and a float32 GEMM
# rather than aten's int8 kernel: on the 2-core AVX2 machine (benchmarks/quant_kernels.py, SmolLM2's layer
# shapes, bfloat16 activations) the slabs measured 0.8x the packed kernel at 64 rows, 1.17x at 128 and 1.5x
# at 512. int4's packed kernel stayed ahead of its slabs up to 512 rows (unpacking nibbles costs more), so
# int4 has no such switch.
INT8_DEQUANT_GEMM_MIN_ROWS = 128
# Where bfloat16 is native (AVX-512 BF16), aten's int8 kernel falls behind bfloat16's own GEMM from a few rows:
# with SmolLM2's four projections, 30 layers, 1 thread, it measured 1.79x bfloat16 at 1 row, 0.96x at 8, 0.62x
# at 16 and 0.41x at 128, while codes converted to bfloat16 and bfloat16's GEMM measured 0.86-0.98x at 8 to 128.
INT8_BF16_GEMM_MIN_ROWS = 8
_SLAB_FLOATS = 1 << 18  # a slab of rows x K float32 values: 1 MB, inside a core's L2
_BF16_SLAB_VALUES = 1 << 22  # bounds int8_bf16_gemm's transient bfloat16 copy: 8 MB (the LM head has 28M values)


def int8pack_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (codes [N, K] int8 * scales [N]).T -> [M, N]; scales already in x's dtype."""
    return torch.ops.aten._weight_int8pack_mm(x, codes, scales)


def int8_channel_kernel(rows: int, mode: str) -> str:
    """The CPU kernel of a per-channel int8 matmul of `rows` rows: "int8pack" (aten's int8 kernel), "bf16_gemm"
    (int8_bf16_gemm) or "f32_slabs" (tiled_dequant_matmul). `mode` (int8_activation_mode): "bf16_native",
    "bf16" or "float"."""
    if mode == "float":
        return "f32_slabs"
    if mode == "bf16_native":
        return "bf16_gemm" if rows >= INT8_BF16_GEMM_MIN_ROWS else "int8pack"
    return "f32_slabs" if rows >= INT8_DEQUANT_GEMM_MIN_ROWS else "int8pack"


def packed_kernels_fit(dtype: torch.dtype) -> bool:
    """Whether aten's packed int8 / int4 kernels suit activations of `dtype`: bfloat16 only. With float32 ones
    (3072 x 576, 1 thread, AVX-512) the int8 kernel took 1.3x the float32 slabs' time at 1 row, 7x at 8 and 30x
    at 64, the int4 kernel 50-70x float32's GEMM from 64 rows; float activations take the slabs instead."""
    return dtype == torch.bfloat16


def int8_activation_mode(dtype: torch.dtype, native_bf16: bool) -> str:
    """int8_channel_kernel's mode for a layer computing in `dtype` on a CPU with or without native bfloat16."""
    if not packed_kernels_fit(dtype):
        return "float"
    return "bf16_native" if native_bf16 else "bf16"


def int8_bf16_gemm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] bfloat16 @ (codes [N, K] int8 * scales [N]).T: slabs of codes converted to bfloat16, a bfloat16
    GEMM, the output columns scaled. One opaque op under torch.compile, for the reason tiled_dequant_matmul is."""
    return _int8_bf16_gemm_op(x, codes, scales)


@torch.library.custom_op("tokenmill::int8_bf16_gemm", mutates_args=())
def _int8_bf16_gemm_op(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    rows_total, width = codes.shape
    rows = max(16, _BF16_SLAB_VALUES // width // 16 * 16)
    if rows >= rows_total:
        return torch.nn.functional.linear(x, codes.to(torch.bfloat16)) * scales
    out_t = torch.empty(rows_total, x.shape[0], dtype=x.dtype, device=x.device)  # row slabs write rows
    for start in range(0, rows_total, rows):
        stop = min(start + rows, rows_total)
        torch.mm(codes[start:stop].to(torch.bfloat16), x.t(), out=out_t[start:stop])
    return (out_t * scales[:, None]).t().contiguous()  # contiguous, as its fake kernel says


@_int8_bf16_gemm_op.register_fake
def _(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], codes.shape[0])


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
    # Slabs of whole rows (output channels), dequantized in float32 whatever x's dtype: every row of the output
    # is then one full-K float32 GEMM (one rounding at the end, as the float32 twin has), and a float32 GEMM
    # on a CPU without AVX-512 runs several times faster than a bfloat16 one at a few rows and up.
    width = x.shape[1]
    x32 = x.float()
    rows_total = qweight.shape[0]
    out_t = torch.empty(rows_total, x.shape[0], dtype=torch.float32, device=x.device)  # row slabs write rows
    groups = scales.shape[1]
    rows = max(16, _SLAB_FLOATS // width // 16 * 16)
    for start in range(0, rows_total, rows):
        stop = min(start + rows, rows_total)
        packed = qweight[start:stop]
        codes = (unpack_codes(packed, bits) if bits < 8 else packed).float()
        slab = codes.view(stop - start, groups, width // groups)
        if qzeros is not None:
            slab = slab - qzeros[start:stop, :, None]
        slab = (slab * scales[start:stop, :, None]).view(stop - start, width)
        torch.mm(slab, x32.t(), out=out_t[start:stop])
    return out_t.t().to(x.dtype).contiguous()


@_tiled_dequant_matmul_op.register_fake
def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
      bits: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], qweight.shape[0])
