"""The layer walk computes, layer by layer, exactly what the model's own forward computes."""

from __future__ import annotations

import pytest
import torch

from tests.checkpoints import make_checkpoint
from tokenmill.attention.metadata import forward_context
from tokenmill.models.loader import load_model
from tokenmill.tools.layer_walk import LayerWalk

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: local and global layers get different tables
def test_walking_every_layer_reproduces_the_forward(family: str, tmp_path) -> None:
    model, _ = load_model(make_checkpoint(family, tmp_path, num_layers=3), dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    windows = [torch.randint(8, 512, (40,), generator=generator).tolist() for _ in range(5)]
    walk = LayerWalk(model, windows, batch_windows=2)
    assert len(walk.batches) == 3 and walk.num_tokens == 200
    seen: dict[str, int] = {}
    walk.collect(0, lambda name, x: seen.__setitem__(name, seen.get(name, 0) + x.shape[0]))
    assert seen == {"self_attn.qkv_proj": 200, "self_attn.o_proj": 200, "mlp.gate_up_proj": 200,
                    "mlp.down_proj": 200}
    last = len(walk.layers) - 1
    for index in range(last):
        walk.advance(index)
    for (ids, positions, metadata), state, extra in zip(walk.batches, walk.states, walk.extras[last]):
        with torch.no_grad(), forward_context(metadata):
            hidden, residual = walk.layers[last](state[0], state[1], *extra)
            walked = model.model.norm.add_and_norm(hidden, residual)[0]
            assert torch.allclose(walked, model(ids, positions), atol=1e-5)
