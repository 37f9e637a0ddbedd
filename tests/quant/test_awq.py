"""AWQ: folding the scales keeps the float model's function exactly; the search lowers the output error below
RTN's when a few input channels carry large activations."""

from __future__ import annotations

import pytest
import torch

from tests.checkpoints import make_checkpoint
from tokenmill.attention.metadata import build_attention_metadata, forward_context
from tokenmill.models.loader import load_model
from tokenmill.quant.awq import scale_columns, search_scales, tie_heads, value_row_scales
from tokenmill.quant.codes import QuantSpec
from tokenmill.quant.weight_quantizer import WeightQuantizer
from tokenmill.tools.quantize_layers import awq_folds
from tokenmill.worker.kv_cache_alloc import allocate_kv_caches

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def logits_of(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    metadata = build_attention_metadata([0], [len(ids)], [list(range(4))], 16, torch.device("cpu"))
    with torch.no_grad(), forward_context(metadata):
        return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids))))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])  # plain, q/k/v bias, Gemma's (1 + w) norms
def test_folding_scales_keeps_the_model_the_same(family: str, tmp_path) -> None:
    model, _ = load_model(make_checkpoint(family, tmp_path), dtype=torch.float32)
    allocate_kv_caches(model.attention_layers(), 4, 16, torch.float32, torch.device("cpu"))
    ids = torch.randint(8, 512, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    before = logits_of(model, ids)
    generator = torch.Generator().manual_seed(1)
    folded = []
    for layer in model.model.layers:
        linears = dict(layer.named_modules())
        for name, fold, tie in awq_folds(layer):
            width = linears[name].input_size
            scales = torch.rand(width, generator=generator) * 3 + 0.2
            scales = tie(scales) if tie is not None else scales
            fold(scales)
            scale_columns(linears[name].weight.data, scales)
            folded.append(name)
    assert set(folded) == {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}
    after = logits_of(model, ids)
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)
    assert not torch.equal(after, before)  # the weights did change


def test_tied_head_scales_map_to_value_rows() -> None:
    tie = tie_heads(num_heads=4, num_kv_heads=2, head_dim=3)
    tied = tie(torch.arange(12.0))
    # heads 0,1 read value head 0; channel d of both shares the mean of their magnitudes
    assert tied.tolist() == [1.5, 2.5, 3.5, 1.5, 2.5, 3.5, 7.5, 8.5, 9.5, 7.5, 8.5, 9.5]
    assert value_row_scales(tied, 4, 2, 3).tolist() == [1.5, 2.5, 3.5, 7.5, 8.5, 9.5]


@pytest.mark.parametrize(("spec", "fit"), [(QuantSpec("int4", 32), False), (QuantSpec("w2", 32, True), True),
                                           (QuantSpec("int8"), False)])
def test_search_lowers_output_error_below_rtn(spec: QuantSpec, fit: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 128, generator=generator)
    inputs = torch.randn(1024, 128, generator=generator)
    inputs[:, torch.randperm(128, generator=generator)[:6]] *= 30  # outlier channels, as LLM activations have
    quantizer = WeightQuantizer(spec, fit)
    search = search_scales(quantizer, weight, inputs)
    reference = inputs @ weight.T
    rtn = float((inputs @ quantizer.fake(weight).T - reference).square().sum())
    awq = float((inputs @ (quantizer.fake(weight * search.scales) / search.scales).T - reference).square().sum())
    assert search.rtn_loss == pytest.approx(rtn, rel=1e-5)
    assert search.loss == pytest.approx(awq, rel=1e-5)
    assert search.alpha > 0 and awq < 0.9 * rtn
