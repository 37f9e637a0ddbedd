"""The ceiling's inputs: bytes read per decode step, and the size of the buffer the CPU read is timed over."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tokenmill.bench.roofline import (
    MAX_READ_BUFFER,
    MIN_READ_BUFFER,
    kv_bytes_per_sequence,
    last_level_cache_bytes,
    read_buffer_bytes,
    weight_bytes_per_step,
)
from tokenmill.models.loader import load_model

SHAPE = dict(vocab=512, hidden=64, inter=96, layers=3, heads=4, kv_heads=2, head_dim=16)


def _llama(folder: Path, tied: bool, dtype: str) -> nn.Module:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": SHAPE["vocab"],
        "hidden_size": SHAPE["hidden"], "intermediate_size": SHAPE["inter"], "num_hidden_layers": SHAPE["layers"],
        "num_attention_heads": SHAPE["heads"], "num_key_value_heads": SHAPE["kv_heads"],
        "head_dim": SHAPE["head_dim"], "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tied,
    }))
    model, _ = load_model(folder, dtype=dtype, load_format="random")
    return model


def _expected_elements(tied: bool, batch: int) -> int:
    """Counted from the shape, not from the module: what one step reads, in elements."""
    h, v, i = SHAPE["hidden"], SHAPE["vocab"], SHAPE["inter"]
    q, kv = SHAPE["heads"] * SHAPE["head_dim"], SHAPE["kv_heads"] * SHAPE["head_dim"]
    layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h  # q, k, v, o, gate/up/down, two norms
    head = v * h  # the LM head reads its whole matrix
    embedding = 0 if tied else batch * h  # a row per token, unless the head already read the table
    return SHAPE["layers"] * layer + h + head + embedding


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype, size", [("float32", 4), ("bfloat16", 2)])
def test_weight_bytes_read_once_with_one_embedding_row_per_token(tmp_path, tied, dtype, size):
    model = _llama(tmp_path / "m", tied, dtype)
    for batch in (1, 8):
        assert weight_bytes_per_step(model, batch) == size * _expected_elements(tied, batch)


def test_weight_bytes_count_packed_parameters_by_their_storage():
    class Packed(nn.Module):  # what a quantized layer looks like: int8 / packed uint8 weights, float scales
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(100, 32)
            self.qweight = nn.Parameter(torch.zeros(64, 16, dtype=torch.uint8), requires_grad=False)
            self.scales = nn.Parameter(torch.zeros(64, dtype=torch.float16), requires_grad=False)

    assert weight_bytes_per_step(Packed(), batch_size=3) == 64 * 16 + 64 * 2 + 3 * 32 * 4


def test_kv_bytes_use_the_bound_cache_element_size(tmp_path):
    model = _llama(tmp_path / "m", False, "float32")
    per_token_elements = SHAPE["layers"] * 2 * SHAPE["kv_heads"] * SHAPE["head_dim"]
    assert kv_bytes_per_sequence(model, 100, torch.float32) == 100 * per_token_elements * 4
    for layer in model.attention_layers():  # a cache stored narrower than the weights counts its own bytes
        layer.kv_cache = torch.zeros(2, 1, 16, SHAPE["kv_heads"], SHAPE["head_dim"], dtype=torch.bfloat16)
    assert kv_bytes_per_sequence(model, 100, torch.float32) == 100 * per_token_elements * 2
    for layer in model.attention_layers():  # int8 codes and a float16 scale per token and KV head
        layer.kv_cache = torch.zeros(2, 1, 16, SHAPE["kv_heads"], SHAPE["head_dim"], dtype=torch.int8)
    scales = SHAPE["layers"] * 2 * SHAPE["kv_heads"] * 2
    assert kv_bytes_per_sequence(model, 100, torch.float32) == 100 * (per_token_elements + scales)


def test_last_level_cache_is_the_highest_level_sysfs_reports(tmp_path):
    for index, (level, size) in enumerate([(1, "48K"), (1, "64K"), (2, "2048K"), (3, "491520K")]):
        folder = tmp_path / f"index{index}"
        folder.mkdir()
        (folder / "level").write_text(f"{level}\n")
        (folder / "size").write_text(f"{size}\n")
    assert last_level_cache_bytes(tmp_path) == 480 << 20
    assert last_level_cache_bytes(tmp_path / "absent") is None


def test_read_buffer_is_well_past_the_cache_within_bounds():
    assert read_buffer_bytes(96 << 20) == 4 * (96 << 20)
    assert read_buffer_bytes(8 << 20) == MIN_READ_BUFFER
    assert read_buffer_bytes(480 << 20) == 1920 << 20  # this machine's reported L3
    assert read_buffer_bytes(1 << 30) == MAX_READ_BUFFER
    assert read_buffer_bytes(None) == MAX_READ_BUFFER


def test_weight_bytes_of_experts_count_only_the_experts_a_step_routes_to(tmp_path):
    folder = tmp_path / "moe"
    folder.mkdir()
    h, v, i, experts, top_k = 64, 512, 32, 8, 2
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": v, "hidden_size": h,
        "intermediate_size": i, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_local_experts": experts, "num_experts_per_tok": top_k, "tie_word_embeddings": True,
    }))
    model, _ = load_model(folder, dtype="float32", load_format="random")
    attention = h * h + 2 * h * (h // 2) + h * h
    rest = attention + experts * h + 2 * h + h + v * h  # router, layer norms, final norm, tied head/table
    for batch, read in ((1, 2), (3, 6), (8, 8)):
        assert weight_bytes_per_step(model, batch) == 4 * (rest + read * 3 * h * i)
