"""The sparse MoE block against a naive per-token loop, its routing rules, and its expert-call count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.errors import ModelLoadError
from tokenmill.layers.moe import MIXTRAL_EXPERT_PARTS, SparseMoeBlock

HIDDEN, INTER, EXPERTS, TOP_K = 32, 24, 8, 2


def make_block(renormalize: bool, weights_in_model_dtype: bool = False, dtype: torch.dtype = torch.float32,
               seed: int = 0) -> SparseMoeBlock:
    block = SparseMoeBlock(HIDDEN, INTER, EXPERTS, TOP_K, renormalize, weights_in_model_dtype, dtype,
                           torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return block


def naive(block: SparseMoeBlock, x: torch.Tensor, softmax_over_top_k: bool) -> torch.Tensor:
    """Token by token, expert by expert, straight from the definitions (Mixtral: softmax over the top-k
    logits; Qwen3-MoE without norm_topk_prob: softmax over all, then the top k as they are)."""
    gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = block.gate.weight @ x[t]
        top_logits, ids = torch.topk(logits, TOP_K)
        weights = torch.softmax(top_logits, -1) if softmax_over_top_k else torch.softmax(logits, -1)[ids]
        for weight, expert in zip(weights, ids.tolist()):
            gate, up = (gate_up[expert] @ x[t]).split(INTER)
            out[t] += weight * (down[expert] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("num_tokens", [1, 5, 64])
def test_block_matches_the_per_token_definition(renormalize, num_tokens):
    block = make_block(renormalize)
    x = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(num_tokens))
    with torch.inference_mode():
        actual = block(x)
    expected = naive(block, x, softmax_over_top_k=renormalize)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_without_renormalization_the_weights_do_not_sum_to_one():
    block = make_block(renormalize=False)
    x = torch.randn(16, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert not torch.allclose(block(x), make_block(renormalize=True)(x), atol=1e-3)


def test_bfloat16_block_is_close_to_float32():
    x = torch.randn(40, HIDDEN, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = make_block(True)(x)
        for in_model_dtype in (False, True):
            half = make_block(True, in_model_dtype, torch.bfloat16)(x.bfloat16())
            assert half.dtype == torch.bfloat16
            assert ((half.float() - full).abs().max() / full.abs().max()).item() < 0.05


def test_expert_matmuls_grow_with_experts_never_with_tokens():
    block = make_block(True)
    for num_tokens in (1, 32, 512):
        block.experts.expert_calls = 0
        x = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(num_tokens))
        with torch.inference_mode():
            block(x)
        assert 1 <= block.experts.expert_calls <= EXPERTS
    assert block.experts.expert_calls == EXPERTS  # 512 tokens use every expert, once each


def test_empty_batch():
    with torch.inference_mode():
        assert make_block(True)(torch.empty(0, HIDDEN)).shape == (0, HIDDEN)


def test_weight_loader_places_per_expert_and_fused_tensors():
    block = make_block(True)
    experts = block.experts
    generator = torch.Generator().manual_seed(3)
    gate, up, down = (torch.randn(s, generator=generator) for s in ((INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)))
    parts = SparseMoeBlock(HIDDEN, INTER, EXPERTS, TOP_K, True, False, torch.float32, torch.device("cpu"),
                           MIXTRAL_EXPERT_PARTS).experts.checkpoint_parts()
    assert parts["5.w1.weight"] == ("gate_up_proj", "5.gate") and parts["5.w3.weight"] == ("gate_up_proj", "5.up")
    assert parts["5.w2.weight"] == ("down_proj", "5") and len(parts) == 3 * EXPERTS
    experts.weight_loader(experts.gate_up_proj, gate, "5.gate")
    experts.weight_loader(experts.gate_up_proj, up, "5.up")
    experts.weight_loader(experts.down_proj, down, "5")
    assert torch.equal(experts.gate_up_proj[5], torch.cat([gate, up]))
    assert torch.equal(experts.down_proj[5], down)
    stacked = torch.randn(EXPERTS, HIDDEN, INTER, generator=generator)
    experts.weight_loader(experts.down_proj, stacked)
    assert torch.equal(experts.down_proj, stacked)
    with pytest.raises(ModelLoadError, match=r"\(24, 32\) does not fit \(32, 24\)"):
        experts.weight_loader(experts.down_proj, gate, "1")
    with pytest.raises(ModelLoadError, match="no shard '8.gate'"):
        experts.weight_loader(experts.gate_up_proj, gate, "8.gate")


def test_compiles_without_graph_breaks_and_computes_the_same():
    """Under torch.compile the expert loop is one opaque custom op, so the graph is whole (fullgraph)."""
    block = make_block(False, weights_in_model_dtype=True)
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    with torch.inference_mode():
        for num_tokens in (3, 17):
            x = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(num_tokens))
            before = block.experts.expert_calls
            actual = compiled(x)
            assert block.experts.expert_calls > before  # the op ran the layer's experts, counted
            torch.testing.assert_close(actual, block(x), rtol=1e-5, atol=1e-5)
