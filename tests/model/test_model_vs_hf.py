"""Each family's logits equal transformers' (fp32, CPU): whole prompts, chunks over the cache, batches."""

from __future__ import annotations

import pytest
import torch

from tests.checkpoints import FAMILIES, make_checkpoint
from tokenmill.models.loader import load_model
from tokenmill.attention.metadata import build_attention_metadata, forward_context
from tokenmill.worker.kv_cache_alloc import allocate_kv_caches

BLOCK = 16


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    built = {}

    def get(family: str):
        if family not in built:
            from transformers import AutoModelForCausalLM

            path = make_checkpoint(family, tmp_path_factory.mktemp(family))
            ours, _ = load_model(path, dtype=torch.float32)
            allocate_kv_caches(ours.attention_layers(), 64, BLOCK, torch.float32, torch.device("cpu"))
            reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            built[family] = (ours, reference)
        return built[family]

    return get


def run_chunks(model, chunks: list[tuple[list[int], int, list[int]]]) -> torch.Tensor:
    """One flat forward over (token_ids, start_pos, block_table) chunks; logits at every position."""
    metadata = build_attention_metadata(
        [start for _, start, _ in chunks], [len(ids) for ids, _, _ in chunks], [table for _, _, table in chunks],
        BLOCK, torch.device("cpu"),
    )
    ids = torch.tensor([t for ids, _, _ in chunks for t in ids])
    positions = torch.tensor([p for ids, start, _ in chunks for p in range(start, start + len(ids))])
    with torch.inference_mode(), forward_context(metadata):
        return model.compute_logits(model(ids, positions))


def reference_logits(reference, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_prompt_logits_match_at_every_position(family, family_models):
    ours, reference = family_models(family)
    ids = torch.randint(8, 512, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    table = list(range(19))  # 300 tokens need 19 blocks of 16
    assert relative_error(run_chunks(ours, [(ids, 0, table)]), reference_logits(reference, ids)) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prompt_over_the_cache_matches(family, family_models):
    ours, reference = family_models(family)
    ids = torch.randint(8, 512, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    table = [40, 3, 17, 9, 22, 5, 31, 11, 2, 60]  # scattered, non-contiguous pages
    logits = [run_chunks(ours, [(ids[s : s + 37], s, table)]) for s in range(0, 150, 37)]
    assert relative_error(torch.cat(logits), reference_logits(reference, ids)) < 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "mixtral", "qwen3_moe"])
def test_two_sequences_in_one_flat_batch_match(family, family_models):
    ours, reference = family_models(family)
    generator = torch.Generator().manual_seed(2)
    a = torch.randint(8, 512, (45,), generator=generator).tolist()
    b = torch.randint(8, 512, (20,), generator=generator).tolist()
    table_a, table_b = [1, 7, 4], [6, 0]  # interleaved pages
    # First a prefix of each, then the rest of a batched with one more chunk of b.
    run_chunks(ours, [(a[:30], 0, table_a), (b[:5], 0, table_b)])
    logits = run_chunks(ours, [(a[30:], 30, table_a), (b[5:], 5, table_b)])
    assert relative_error(logits[:15], reference_logits(reference, a)[30:]) < 1e-4
    assert relative_error(logits[15:], reference_logits(reference, b)[5:]) < 1e-4


@pytest.mark.parametrize("family", ["mistral", "mixtral"])
def test_sliding_window_matches(family, tmp_path):
    from transformers import AutoModelForCausalLM

    path = make_checkpoint(family, tmp_path / "sw", sliding_window=64)
    ours, arch = load_model(path, dtype=torch.float32)
    assert arch.sliding_window == 64
    allocate_kv_caches(ours.attention_layers(), 32, BLOCK, torch.float32, torch.device("cpu"))
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(8, 512, (300,), generator=torch.Generator().manual_seed(3)).tolist()
    logits = torch.cat([run_chunks(ours, [(ids[s : s + 100], s, list(range(19)))]) for s in range(0, 300, 100)])
    expected = reference_logits(reference, ids)
    assert relative_error(logits, expected) < 1e-4
    # The window matters: without it the late positions differ.
    ours.attention_layers()[0].sliding_window = None
    assert relative_error(run_chunks(ours, [(ids, 0, list(range(19)))])[-1:], expected[-1:]) > 1e-3


def test_qwen3_moe_every_second_layer_sparse_with_renormalized_routing_matches(tmp_path):
    from transformers import AutoModelForCausalLM

    path = make_checkpoint("qwen3_moe", tmp_path / "step2", decoder_sparse_step=2, mlp_only_layers=[],
                           norm_topk_prob=True)
    ours, arch = load_model(path, dtype=torch.float32)
    assert arch.moe_layers == (False, True) and arch.norm_topk_prob
    allocate_kv_caches(ours.attention_layers(), 32, BLOCK, torch.float32, torch.device("cpu"))
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(8, 512, (120,), generator=torch.Generator().manual_seed(4)).tolist()
    logits = torch.cat([run_chunks(ours, [(ids[s : s + 50], s, list(range(8)))]) for s in range(0, 120, 50)])
    assert relative_error(logits, reference_logits(reference, ids)) < 1e-4
