"""Checkpoint loading: shards, dtypes, random weights, and errors that name the file or tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.checkpoints import make_checkpoint
from tokenmill.errors import ModelLoadError
from tokenmill.models.loader import load_model
from tokenmill.platform import cpu_bf16_prepack_available


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory) -> Path:
    return make_checkpoint("llama", tmp_path_factory.mktemp("llama"))


def copy_of(path: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(path, target)
    return target


def test_sharded_checkpoint_loads_the_same_weights(llama_path, tmp_path):
    sharded = make_checkpoint("llama", tmp_path / "sharded", shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) >= 2
    whole, _ = load_model(llama_path, dtype=torch.float32)
    parts, _ = load_model(sharded, dtype=torch.float32)
    for (name, a), (_, b) in zip(whole.named_parameters(), parts.named_parameters()):
        assert torch.equal(a, b), name


def test_dtype_auto_and_explicit(llama_path):
    model, arch = load_model(llama_path, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    model, _ = load_model(llama_path, dtype="auto")
    assert next(model.parameters()).dtype == torch.float32  # the config's torch_dtype


def test_random_load_format_needs_only_config(llama_path, tmp_path):
    folder = tmp_path / "shape-only"
    folder.mkdir()
    shutil.copy(llama_path / "config.json", folder / "config.json")
    model, arch = load_model(folder, dtype=torch.float32, load_format="random")
    weight = model.model.layers[0].mlp.gate_up_proj.weight
    assert 0.015 < weight.std().item() < 0.025
    assert torch.all(model.model.norm.weight == 1)


def test_tied_embeddings_need_no_lm_head(tmp_path):
    path = make_checkpoint("qwen3", tmp_path / "tied")
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    model, arch = load_model(path, dtype=torch.float32)
    assert arch.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight


def test_missing_folder_names_the_path(tmp_path):
    with pytest.raises(ModelLoadError, match="nowhere.*does not exist"):
        load_model(tmp_path / "nowhere")


def test_missing_config_names_the_file(llama_path, tmp_path):
    path = copy_of(llama_path, tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config\.json: missing"):
        load_model(path)


def test_invalid_config_json_names_the_file(llama_path, tmp_path):
    path = copy_of(llama_path, tmp_path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json: not valid JSON"):
        load_model(path)


def test_no_weights_is_an_error(llama_path, tmp_path):
    path = copy_of(llama_path, tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        load_model(path)


def test_corrupt_weights_name_the_file(llama_path, tmp_path):
    path = copy_of(llama_path, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        load_model(path)


def test_wrong_shape_names_the_tensor_and_both_shapes(llama_path, tmp_path):
    path = copy_of(llama_path, tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    message = str(info.value)
    assert "model.layers.1.mlp.up_proj.weight" in message and "(100, 64)" in message and "(128, 64)" in message


def test_missing_tensor_is_named(llama_path, tmp_path):
    path = copy_of(llama_path, tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="model.norm.weight"):
        load_model(path)


def test_unknown_architecture_lists_the_supported_ones(llama_path, tmp_path):
    path = copy_of(llama_path, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="FalconForCausalLM.*not supported.*Gemma2ForCausalLM.*"
                                             "Gemma3ForCausalLM.*Phi3ForCausalLM.*Qwen3ForCausalLM"):
        load_model(path)


def test_unsupported_rope_scaling_is_named(llama_path, tmp_path):
    path = copy_of(llama_path, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="yarn"):
        load_model(path)


def test_fused_layers_hold_the_checkpoint_shards_in_order(llama_path):
    """q/k/v and gate/up load into one weight each, row shards in the order of the packed-module map."""
    model, _ = load_model(llama_path, dtype=torch.float32)
    tensors = load_file(llama_path / "model.safetensors")
    attention = model.model.layers[1].self_attn
    expected = torch.cat([tensors[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(attention.qkv_proj.weight, expected)
    mlp = model.model.layers[1].mlp
    expected = torch.cat([tensors[f"model.layers.1.mlp.{p}_proj.weight"] for p in ("gate", "up")])
    assert torch.equal(mlp.gate_up_proj.weight, expected)


@pytest.mark.skipif(not cpu_bf16_prepack_available(), reason="oneDNN reorders bf16 weights only on AVX-512 CPUs")
def test_prepacked_bfloat16_weights_compute_exactly_what_plain_ones_do(llama_path, tmp_path):
    from tokenmill.layers.linear import UnquantizedLinearMethod

    plain, _ = load_model(llama_path, dtype="bfloat16")
    packed, _ = load_model(llama_path, dtype="bfloat16", quant=UnquantizedLinearMethod(prepack_cpu=True))
    layer, reference = packed.model.layers[0].mlp.gate_up_proj, plain.model.layers[0].mlp.gate_up_proj
    assert layer.prepacked and not reference.prepacked
    x = torch.randn(5, layer.input_size, generator=torch.Generator().manual_seed(0)).bfloat16()
    assert torch.equal(layer(x), reference(x))
    assert packed.lm_head.prepacked  # llama's own LM head
    tied, _ = load_model(make_checkpoint("qwen3", tmp_path / "tied"), dtype="bfloat16",
                         quant=UnquantizedLinearMethod(prepack_cpu=True))
    assert tied.lm_head.prepacked and tied.lm_head.weight is tied.model.embed_tokens.weight
    assert not tied.model.embed_tokens.weight.is_mkldnn  # lookups read the plain matrix; the head packs a copy


def test_already_fused_tensors_load_whole(llama_path, tmp_path):
    """A checkpoint that stores qkv_proj / gate_up_proj fused (as Phi-3's do) loads the same weights as the
    split one; a fused layer missing some of its split shards names them."""
    path = copy_of(llama_path, tmp_path)
    tensors = load_file(path / "model.safetensors")
    for layer in range(2):
        prefix = f"model.layers.{layer}"
        tensors[f"{prefix}.self_attn.qkv_proj.weight"] = torch.cat(
            [tensors.pop(f"{prefix}.self_attn.{p}_proj.weight") for p in "qkv"])
        tensors[f"{prefix}.mlp.gate_up_proj.weight"] = torch.cat(
            [tensors.pop(f"{prefix}.mlp.{p}_proj.weight") for p in ("gate", "up")])
    save_file(tensors, path / "model.safetensors")
    fused, _ = load_model(path, dtype=torch.float32)
    split, _ = load_model(llama_path, dtype=torch.float32)
    for (name, a), (_, b) in zip(fused.named_parameters(), split.named_parameters()):
        assert torch.equal(a, b), name

    del tensors["model.layers.1.mlp.gate_up_proj.weight"]
    tensors["model.layers.1.mlp.gate_proj.weight"] = torch.zeros(128, 64)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"lacks 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(path)
    del tensors["model.layers.1.mlp.gate_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.gate_up_proj\.weight \(or .*gate_proj"):
        load_model(path)


def test_gemma_random_weights_start_from_identity_norms(tmp_path):
    """Gemma's norms scale by (1 + weight): random-weight models get zero norm weights, Llama's get ones."""
    folder = tmp_path / "gemma-shape"
    folder.mkdir()
    shutil.copy(make_checkpoint("gemma2", tmp_path / "gemma2") / "config.json", folder / "config.json")
    model, _ = load_model(folder, dtype=torch.float32, load_format="random")
    assert torch.all(model.model.norm.weight == 0)
    assert torch.all(model.model.layers[0].post_feedforward_layernorm.weight == 0)


def test_gemma_with_another_activation_is_rejected_by_name(tmp_path):
    path = make_checkpoint("gemma3", tmp_path / "gemma3")
    config = json.loads((path / "config.json").read_text())
    config["hidden_activation"] = "relu"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="hidden_activation 'relu'"):
        load_model(path)
