"""GGUF checkpoints: config from metadata, weights equal to transformers' reading of the same file (q/k rows
un-permuted), and errors that name the file and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenmill.errors import ModelLoadError
from tokenmill.models.gguf import is_gguf_path
from tokenmill.models.loader import load_model, read_checkpoint_arch

pytest.importorskip("gguf")
from tests.gguf_files import make_gguf  # noqa: E402


@pytest.fixture(scope="module")
def llama_q8(tmp_path_factory) -> Path:
    """Llama (q/k permuted in the file, head_dim != hidden / heads), Q8_0 matrices, sentencepiece tokenizer."""
    return make_gguf("llama", tmp_path_factory.mktemp("llama"), tensor_type="Q8_0", tokenizer="llama")


@pytest.fixture(scope="module")
def qwen3_f32(tmp_path_factory) -> Path:
    return make_gguf("qwen3", tmp_path_factory.mktemp("qwen3"))


def _reference_state(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).state_dict()


def test_weights_equal_transformers_reading_of_the_same_file(llama_q8):
    model, arch = load_model(llama_q8, dtype="float32")
    ref = _reference_state(llama_q8)
    attn = model.model.layers[1].self_attn
    q, k, v = attn.qkv_proj.weight.split([attn.q_size, attn.kv_size, attn.kv_size])
    assert torch.equal(q, ref["model.layers.1.self_attn.q_proj.weight"])  # the permutation is undone
    assert torch.equal(k, ref["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(v, ref["model.layers.1.self_attn.v_proj.weight"])
    gate, up = model.model.layers[0].mlp.gate_up_proj.weight.chunk(2)
    assert torch.equal(gate, ref["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(up, ref["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(model.lm_head.weight, ref["lm_head.weight"])
    assert torch.equal(model.model.norm.weight, ref["model.norm.weight"])


def test_config_comes_from_the_metadata(llama_q8, qwen3_f32):
    arch = read_checkpoint_arch(llama_q8)
    assert (arch.architecture, arch.num_layers, arch.hidden_size, arch.intermediate_size) == (
        "LlamaForCausalLM", 2, 64, 128)
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim) == (4, 2, 24)
    assert arch.vocab_size == 589 and arch.max_position_embeddings == 1024  # vocab: the token list's length
    assert not arch.tie_word_embeddings and arch.eos_token_ids == (2,) and arch.bos_token_id == 1
    qwen3 = read_checkpoint_arch(qwen3_f32)
    assert qwen3.architecture == "Qwen3ForCausalLM" and qwen3.qk_norm
    assert qwen3.tie_word_embeddings  # no output.weight in the file


def test_dtype_auto_follows_the_file(llama_q8, qwen3_f32, tmp_path):
    model, _ = load_model(qwen3_f32)
    assert next(model.parameters()).dtype == torch.float32  # an F32 file
    model, _ = load_model(llama_q8)
    # Quantized weights load in float32, where their dequantized values are exact (bfloat16 rounds them again).
    assert next(model.parameters()).dtype == torch.float32
    assert read_checkpoint_arch(make_gguf("qwen3", tmp_path, tensor_type="F16")).torch_dtype == "float16"


def test_loading_shows_progress(llama_q8, capsys):
    load_model(llama_q8, dtype="float32", progress=True)
    assert "loading weights" in capsys.readouterr().err


def test_gguf_paths_are_recognised_by_suffix_or_magic(llama_q8, tmp_path):
    assert is_gguf_path(llama_q8) and not is_gguf_path(llama_q8.parent)
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(llama_q8.read_bytes())
    assert is_gguf_path(renamed)
    assert read_checkpoint_arch(renamed).architecture == "LlamaForCausalLM"


def test_a_file_that_is_not_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf file at all")
    with pytest.raises(ModelLoadError, match=r"x\.gguf: not a GGUF file"):
        load_model(bad)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"empty\.gguf: not a GGUF file"):
        load_model(tmp_path / "empty.gguf")


def test_truncated_files(llama_q8, tmp_path):
    data = llama_q8.read_bytes()
    header_cut = tmp_path / "header.gguf"
    header_cut.write_bytes(data[:200])
    with pytest.raises(ModelLoadError, match=r"header\.gguf: truncated: the header ends"):
        load_model(header_cut)
    data_cut = tmp_path / "data.gguf"
    data_cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelLoadError, match=r"data\.gguf: truncated: tensor \S+ ends at byte \d+, the file has"):
        load_model(data_cut)


def test_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "x.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    message = r"x\.gguf: architecture 'mamba' is not supported \(supported: llama, qwen2, qwen3\)"
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_unsupported_tensor_type(tmp_path):
    path = make_gguf("qwen2", tmp_path, raw_types={"blk.0.attn_q.weight": "Q8_1"})
    message = r"model\.gguf: tensor blk\.0\.attn_q\.weight has type Q8_1, not supported \(supported: F32, F16, "
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)

