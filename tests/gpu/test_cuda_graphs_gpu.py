"""Real CUDA graphs (skipped without a GPU): a captured step replays whatever the next step wrote into the
persistent buffers, and the engine decodes the same tokens with graphs as without."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenmill.attention.metadata import get_attention_metadata
from tokenmill.core.sched_io import ScheduledChunk, SchedulerOutput
from tokenmill.worker.cuda_graphs import DecodeGraphs, capture_cuda_graph
from tokenmill.worker.input_batch import InputBatch, PaddedStep

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PAD_BLOCK = 9


def test_a_captured_step_replays_the_inputs_of_later_steps() -> None:
    device = torch.device("cuda")
    batch = InputBatch(max_num_tokens=64, max_blocks_per_request=4, block_size=4, device=device, max_graph_batch=4)
    table = torch.randn(512, 8, device=device)

    def forward(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Reads the ids, positions and the device lengths the way a graph-safe attention backend must.
        lengths = get_attention_metadata().seq_lens_device
        return table[input_ids] * (positions + 1)[:, None] + lengths[:, None]

    def dummy(size: int) -> PaddedStep:
        inputs = batch.prepare(SchedulerOutput(chunks=[ScheduledChunk("x", [0], 0, [PAD_BLOCK], sample=True)]),
                               size, PAD_BLOCK)
        batch.remove("x")
        assert inputs.padded is not None
        return inputs.padded

    graphs = DecodeGraphs([1, 2, 4], pad_block=PAD_BLOCK)
    with torch.inference_mode():
        graphs.capture(forward, dummy, capture_cuda_graph())
        for step, ids in enumerate(([5, 77, 300], [11], [1, 2, 3, 4])):
            chunks = [ScheduledChunk(f"s{step}-r{i}", [t], 3 + i, [2 * i, 2 * i + 1], sample=True)
                      for i, t in enumerate(ids)]
            so = SchedulerOutput(chunks=chunks)
            inputs = batch.prepare(so, graphs.pad_to(so), PAD_BLOCK)
            # Request i decodes at position 3 + i, so its length after the step is 4 + i.
            scale = torch.arange(4, 4 + len(ids), device=device, dtype=torch.float32)[:, None]
            expected = table[torch.tensor(ids, device=device)] * scale + scale
            assert torch.allclose(graphs.replay(inputs.padded), expected)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.checkpoints import make_checkpoint

    return make_checkpoint("llama", tmp_path_factory.mktemp("gpu-graphs"))


def test_the_engine_decodes_the_same_tokens_with_graphs_as_eagerly(tiny_model: Path) -> None:
    from tokenmill.llm import LLM
    from tokenmill.sampling_params import SamplingParams

    prompts = [{"prompt_token_ids": list(range(10, 10 + n))} for n in (3, 17, 40, 5, 9)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (12, 4, 20, 7, 9)]
    results = {}
    for eager in (True, False):
        llm = LLM(str(tiny_model), device="cuda", dtype="float32", enforce_eager=eager, max_num_seqs=8,
                  kv_cache_memory="32MiB", max_model_len=256)
        results[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        backend = llm.engine.worker.model.attention_layers()[0].backend
        assert (llm.engine.worker.runner.graphs is not None) == (not eager and backend.supports_cuda_graphs)
    assert results[False] == results[True]
