"""Expert weights load from both checkpoint layouts: one tensor per expert and projection (what published
checkpoints and transformers' save_pretrained write) and the stacked 3-d tensors of transformers 5's
modules (a state dict saved as it is); which layers are sparse follows the config."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.checkpoints import make_checkpoint
from tokenmill.errors import ModelLoadError
from tokenmill.layers.moe import SparseMoeBlock
from tokenmill.models.loader import load_model

MOE_FAMILIES = ["mixtral", "qwen3_moe"]


@pytest.fixture(scope="module")
def per_expert(tmp_path_factory) -> dict[str, Path]:
    return {family: make_checkpoint(family, tmp_path_factory.mktemp(family)) for family in MOE_FAMILIES}


def stacked_copy(path: Path, out: Path) -> Path:
    """The checkpoint re-saved from transformers' in-memory state dict: experts as [E, 2I, H] / [E, H, I]."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(path, out, ignore=shutil.ignore_patterns("*.safetensors*"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]  # shares the embedding's storage
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_per_expert_and_stacked_layouts_load_the_same_weights(family, per_expert, tmp_path):
    path = per_expert[family]
    names = load_file(path / "model.safetensors").keys()
    expert_name = "block_sparse_moe.experts.3.w3.weight" if family == "mixtral" else "mlp.experts.3.up_proj.weight"
    assert f"model.layers.0.{expert_name}" in names
    stacked = stacked_copy(path, tmp_path / "stacked")
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(stacked / "model.safetensors")
    a, _ = load_model(path, dtype=torch.float32)
    b, _ = load_model(stacked, dtype=torch.float32)
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), name
    # Expert 3's up rows are the second half of its gate/up slab.
    experts = a.model.layers[0].mlp.experts
    assert torch.equal(experts.gate_up_proj[3, experts.intermediate_size:],
                       load_file(path / "model.safetensors")[f"model.layers.0.{expert_name}"])


def test_a_missing_expert_tensor_is_named(per_expert, tmp_path):
    path = tmp_path / "copy"
    shutil.copytree(per_expert["qwen3_moe"], path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.0.mlp.experts.6.down_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"lacks 1 tensor.*model\.layers\.0\.mlp\.experts\.6\.down_proj\.weight"):
        load_model(path)


@pytest.mark.parametrize("overrides, sparse", [
    (dict(decoder_sparse_step=1, mlp_only_layers=[1]), [True, False]),
    (dict(decoder_sparse_step=2, mlp_only_layers=[]), [False, True]),
    (dict(decoder_sparse_step=1, mlp_only_layers=[]), [True, True]),
])
def test_sparse_layers_follow_the_config(overrides, sparse, tmp_path):
    model, arch = load_model(make_checkpoint("qwen3_moe", tmp_path, **overrides), dtype=torch.float32)
    assert list(arch.moe_layers) == sparse
    assert [isinstance(layer.mlp, SparseMoeBlock) for layer in model.model.layers] == sparse
    dense = next((layer.mlp for layer in model.model.layers if not isinstance(layer.mlp, SparseMoeBlock)), None)
    assert dense is None or dense.gate_up_proj.output_size == 2 * arch.intermediate_size


def test_a_config_without_experts_or_with_too_many_per_token_is_named(per_expert, tmp_path):
    import json

    path = tmp_path / "copy"
    shutil.copytree(per_expert["mixtral"], path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(config, num_experts_per_tok=9)))
    with pytest.raises(ModelLoadError, match=r"num_experts_per_tok \(9\) must be between 1 and .* \(8\)"):
        load_model(path)
    del config["num_local_experts"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="MixtralForCausalLM is a mixture of experts.*num_local_experts"):
        load_model(path)
