"""KV-cache quantization: the codes and per-token scales, the store at slots, every attention path reading a
quantized cache, the pool sizing that counts the scales, and the settings that refuse what cannot work."""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_torch_attention import BLOCK, DIM, HEADS, KV_HEADS, NUM_BLOCKS, STEPS, naive
from tokenmill.attention.metadata import build_attention_metadata
from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.errors import ConfigError
from tokenmill.layers.attention import Attention
from tokenmill.quant.kv_cache import SCALE_DTYPE, dequantize_kv, quantize_kv, store_kv_quantized
from tokenmill.worker.kv_cache_alloc import allocate_kv_caches, bytes_per_block, resolve_kv_cache_dtype

CPU = torch.device("cpu")
QUANTIZED = [torch.int8, torch.float8_e4m3fn]


def _values(*shape: int, seed: int = 0) -> torch.Tensor:
    """Rows of very different magnitudes (as keys of different heads are), a few outliers among them."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator) * torch.exp(2 * torch.randn(*shape[:-1], 1, generator=generator))
    x[..., 3] *= 8.0
    return x


def test_int8_scales_are_each_rows_absmax_over_127_and_codes_round_to_nearest() -> None:
    x = _values(50, KV_HEADS, DIM)
    codes, scales = quantize_kv(x, torch.int8)
    assert codes.dtype == torch.int8 and scales.dtype == SCALE_DTYPE and scales.shape == (50, KV_HEADS)
    assert torch.equal(scales, (x.abs().amax(-1) / 127).to(torch.float16))
    assert torch.equal(codes.abs().amax(-1), torch.full((50, KV_HEADS), 127, dtype=torch.int8))  # the absmax: ±127
    assert torch.equal(codes, torch.round(x / scales.float().unsqueeze(-1)).clamp(-127, 127).to(torch.int8))
    error = (dequantize_kv(codes, scales, torch.float32) - x).abs()
    # Half a step, plus float16's rounding of the scale carried to the largest code (127 * 2^-11 steps).
    assert bool((error <= scales.float().unsqueeze(-1) * (0.5 + 127 * 2**-11)).all())


def test_fp8_codes_keep_e4m3_relative_precision() -> None:
    x = _values(50, KV_HEADS, DIM, seed=1)
    codes, scales = quantize_kv(x, torch.float8_e4m3fn)
    assert codes.dtype == torch.float8_e4m3fn
    assert torch.equal(scales, (x.abs().amax(-1) / 448).to(torch.float16))
    step = scales.float().unsqueeze(-1)
    error = (dequantize_kv(codes, scales, torch.float32) - x).abs()
    # 3 mantissa bits: within 2^-4 of the value; e4m3's subnormals step by 2^-9 of the scale near zero.
    assert bool((error <= x.abs() * (2**-4 + 2**-10) + step * 2**-9).all())


@pytest.mark.parametrize("dtype", QUANTIZED)
def test_an_all_zero_head_stores_zeros_with_a_finite_nonzero_scale(dtype: torch.dtype) -> None:
    x = _values(4, KV_HEADS, DIM)
    x[1, 0] = 0.0
    codes, scales = quantize_kv(x, dtype)
    assert bool(torch.isfinite(scales.float()).all()) and float(scales[1, 0]) > 0
    assert bool((dequantize_kv(codes, scales, torch.float32)[1, 0] == 0).all())


@pytest.mark.parametrize("dtype", QUANTIZED)
def test_dequantize_rounds_once_to_the_compute_dtype(dtype: torch.dtype) -> None:
    codes, scales = quantize_kv(_values(8, KV_HEADS, DIM), dtype)
    assert torch.equal(dequantize_kv(codes, scales, torch.float32), codes.float() * scales.float().unsqueeze(-1))
    # In bfloat16: the scale taken in bfloat16, the exact product (8 x 8 significant bits) rounded once.
    exact = codes.double() * scales.to(torch.bfloat16).double().unsqueeze(-1)
    assert torch.equal(dequantize_kv(codes, scales, torch.bfloat16), exact.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", QUANTIZED)
def test_store_writes_codes_and_scales_at_the_slots_and_nothing_else(dtype: torch.dtype) -> None:
    cache = torch.zeros(2, NUM_BLOCKS, BLOCK, KV_HEADS, DIM, dtype=dtype)
    scales = torch.zeros(2, NUM_BLOCKS, BLOCK, KV_HEADS, dtype=SCALE_DTYPE)
    key, value = _values(3, KV_HEADS, DIM, seed=2), _values(3, KV_HEADS, DIM, seed=3)
    slots = torch.tensor([8 * BLOCK + 2, 40 * BLOCK, 40 * BLOCK + 1])
    store_kv_quantized(key, value, cache, scales, slots)
    key_codes, key_scales = quantize_kv(key, dtype)
    value_codes, value_scales = quantize_kv(value, dtype)
    assert torch.equal(cache[0, 8, 2].float(), key_codes[0].float()) and torch.equal(scales[0, 8, 2], key_scales[0])
    assert torch.equal(cache[1, 40, :2].float(), value_codes[1:].float())
    assert torch.equal(scales[1, 40, :2], value_scales[1:])
    assert int((cache.float() != 0).sum()) <= 3 * 2 * KV_HEADS * DIM
    assert int((scales != 0).sum()) == 3 * 2 * KV_HEADS


def test_a_tokens_stored_bytes_do_not_depend_on_the_step_that_wrote_it() -> None:
    """One step for a whole prompt or one token per step (chunked prefill, decode): the same cache bytes."""
    key, value = _values(37, KV_HEADS, DIM, seed=4), _values(37, KV_HEADS, DIM, seed=5)
    slots = torch.arange(37) + 5 * BLOCK
    caches = []
    for pieces in ([slice(0, 37)], [slice(i, i + 1) for i in range(37)], [slice(0, 16), slice(16, 17), slice(17, 37)]):
        cache = torch.zeros(2, NUM_BLOCKS, BLOCK, KV_HEADS, DIM, dtype=torch.int8)
        scales = torch.zeros(2, NUM_BLOCKS, BLOCK, KV_HEADS, dtype=SCALE_DTYPE)
        for piece in pieces:
            store_kv_quantized(key[piece], value[piece], cache, scales, slots[piece])
        caches.append((cache, scales))
    for cache, scales in caches[1:]:
        assert torch.equal(cache, caches[0][0]) and torch.equal(scales, caches[0][1])


def _run_quantized_step(chunks: list[tuple[int, int, list[int]]], window: int | None, dtype: torch.dtype,
                        softcap: float | None, seed: int, compute_dtype: torch.dtype = torch.float32,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like test_torch_attention.run_step, over a quantized cache. Returns the backend's output, the oracle
    over the dequantized keys and values the cache holds (history and this step's tokens alike), and the
    oracle over the unquantized ones."""
    generator = torch.Generator().manual_seed(seed)
    cache = torch.zeros(2, NUM_BLOCKS, BLOCK, KV_HEADS, DIM, dtype=dtype)
    scales = torch.zeros(2, NUM_BLOCKS, BLOCK, KV_HEADS, dtype=SCALE_DTYPE)
    history = []
    for start, _, table in chunks:
        keys = torch.randn(start, KV_HEADS, DIM, generator=generator)
        values = torch.randn(start, KV_HEADS, DIM, generator=generator)
        slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start)], dtype=torch.int64)
        store_kv_quantized(keys, values, cache, scales, slots)
        history.append((keys, values))
    total = sum(n for _, n, _ in chunks)
    q, k, v = (torch.randn(total, h, DIM, generator=generator).to(compute_dtype) for h in (HEADS, KV_HEADS, KV_HEADS))
    metadata = build_attention_metadata([c[0] for c in chunks], [c[1] for c in chunks], [c[2] for c in chunks],
                                        BLOCK, CPU)
    out = TorchAttentionBackend().forward(q, k, v, cache, metadata, DIM**-0.5, window, softcap, kv_scales=scales)

    def stored(x: torch.Tensor) -> torch.Tensor:
        return dequantize_kv(*quantize_kv(x, dtype), torch.float32)

    expected, unquantized, row = [], [], 0
    for (start, count, _), (keys, values) in zip(chunks, history):
        all_keys, all_values = torch.cat([keys, k[row : row + count]]), torch.cat([values, v[row : row + count]])
        expected.append(naive(q[row : row + count], stored(all_keys), stored(all_values), start, window, softcap))
        unquantized.append(naive(q[row : row + count], all_keys, all_values, start, window, softcap))
        row += count
    return out, torch.cat(expected), torch.cat(unquantized)


@pytest.mark.parametrize("dtype", QUANTIZED)
@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("name", list(STEPS))
def test_every_attention_path_reads_what_the_quantized_cache_holds(name: str, window: int | None,
                                                                   softcap: float | None, dtype: torch.dtype) -> None:
    out, expected, _ = _run_quantized_step(STEPS[name], window, dtype, softcap, seed=len(name))
    assert (out.double() - expected).abs().max().item() < 1e-5


def test_a_bfloat16_model_reads_bfloat16_values_from_an_int8_cache() -> None:
    out, expected, _ = _run_quantized_step(STEPS["mixed step"], 8, torch.int8, None, seed=9,
                                           compute_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert (out.double() - expected).abs().max().item() < 3e-2


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.int8, 0.02), (torch.float8_e4m3fn, 0.15)])
def test_quantized_attention_stays_close_to_unquantized_attention(dtype: torch.dtype, tolerance: float) -> None:
    """What the codes cost on a mixed step of random unit-variance keys and values."""
    out, _, unquantized = _run_quantized_step(STEPS["mixed step"], None, dtype, None, seed=3)
    error = (out.double() - unquantized).abs().max().item()
    assert 0 < error < tolerance


def _layers(head_dims: list[int]) -> list[Attention]:
    return [Attention(4, KV_HEADS, d, d**-0.5) for d in head_dims]


def test_bytes_per_block_count_codes_and_scales() -> None:
    layers = _layers([64, 64, 24])
    per_token_head = {torch.float32: [256, 256, 96], torch.bfloat16: [128, 128, 48],
                      torch.int8: [66, 66, 26], torch.float8_e4m3fn: [66, 66, 26]}
    for dtype, sizes in per_token_head.items():
        assert bytes_per_block(layers, BLOCK, dtype) == sum(2 * BLOCK * KV_HEADS * s for s in sizes)
    # At head_dim 64 (SmolLM2), int8 holds 128 / 66 = 1.94x bfloat16's tokens and 3.9x float32's.
    one = _layers([64])
    budget = 1 << 24
    blocks = {d: budget // bytes_per_block(one, BLOCK, d) for d in (torch.float32, torch.bfloat16, torch.int8)}
    assert blocks[torch.int8] / blocks[torch.bfloat16] > 1.9
    assert blocks[torch.int8] / blocks[torch.float32] > 3.8


@pytest.mark.parametrize("dtype", QUANTIZED)
def test_allocation_binds_scales_beside_a_quantized_cache(dtype: torch.dtype) -> None:
    layers = _layers([32, 16])
    caches = allocate_kv_caches(layers, 10, BLOCK, dtype, CPU)
    for layer, cache in zip(layers, caches):
        assert cache.dtype == dtype and cache.shape == (2, 10, BLOCK, KV_HEADS, layer.head_dim)
        assert layer.kv_scales is not None and layer.kv_scales.shape == (2, 10, BLOCK, KV_HEADS)
        assert layer.kv_scales.dtype == SCALE_DTYPE
        total = cache.numel() * cache.element_size() + layer.kv_scales.numel() * layer.kv_scales.element_size()
        assert total == bytes_per_block([layer], BLOCK, dtype) * 10
    allocate_kv_caches(layers, 10, BLOCK, torch.float32, CPU)
    assert all(layer.kv_scales is None for layer in layers)


def test_a_backend_that_cannot_read_quantized_kv_refuses_it() -> None:
    class PlainOnly(TorchAttentionBackend):
        name = "plain-only"
        stores_quantized_kv = False

    with pytest.raises(ConfigError) as info:
        allocate_kv_caches(_layers([16]), 4, BLOCK, torch.int8, CPU, PlainOnly())
    assert info.value.setting == "kv_cache_dtype" and "plain-only attention backend" in str(info.value)


def test_kv_cache_dtype_setting_resolves_to_storage_dtypes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_kv_cache_dtype("auto", torch.bfloat16, CPU) == torch.bfloat16
    assert resolve_kv_cache_dtype("int8", torch.bfloat16, CPU) == torch.int8
    assert resolve_kv_cache_dtype("fp8", torch.float32, CPU) == torch.float8_e4m3fn  # torch stores fp8 on CPU
    monkeypatch.setattr("tokenmill.platform.supports_float8_storage", lambda device: False)
    with pytest.raises(ConfigError) as info:
        resolve_kv_cache_dtype("fp8", torch.float32, CPU)
    assert info.value.setting == "kv_cache_dtype" and "use int8 or auto" in str(info.value)
