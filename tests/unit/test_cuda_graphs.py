"""CUDA-graph decode steps, on the CPU: which size replays, the padding rows and the persistent buffers.

A stand-in capture (EagerCapture) replays by running the forward again, over the step's inputs, after
DecodeGraphs has checked that they live at the captured addresses: exactly what a real graph needs, short of
the graph. The engine then decodes through it and must give the tokens of the plain eager engine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenmill.core.sched_io import ScheduledChunk, SchedulerOutput
from tokenmill.worker.cuda_graphs import DecodeGraphs, capture_sizes, is_plain_decode, padded_size
from tokenmill.worker.input_batch import InputBatch, PaddedStep

BLOCK = 4
PAD_BLOCK = 9


def test_sizes_are_powers_of_two_then_every_eight_up_to_the_most_requests_a_step_holds() -> None:
    assert capture_sizes(256, 2048) == [1, 2, 4, *range(8, 257, 8)]
    assert capture_sizes(10, 2048) == [1, 2, 4, 8, 10]
    assert capture_sizes(3, 2048) == [1, 2, 3]
    assert capture_sizes(1, 2048) == [1]
    assert capture_sizes(256, 20) == [1, 2, 4, 8, 16, 20]  # the token budget caps a decode step too


def test_a_step_replays_the_smallest_size_that_holds_it() -> None:
    sizes = capture_sizes(40, 2048)  # 1 2 4 8 16 24 32 40
    assert [padded_size(n, sizes) for n in (1, 2, 3, 5, 8, 9, 17, 33, 40, 41, 0)] == \
        [1, 2, 4, 8, 8, 16, 24, 40, 40, None, None]


def test_only_plain_decodes_replay() -> None:
    decode = ScheduledChunk("a", [5], 7, [1, 2], sample=True)
    assert is_plain_decode(SchedulerOutput(chunks=[decode, ScheduledChunk("b", [6], 3, [3], sample=True)]))
    for other in (ScheduledChunk("b", [6, 7], 3, [3], sample=True),  # a prefill chunk
                  ScheduledChunk("b", [6], 3, [3], sample=False),  # a chunk that does not sample
                  ScheduledChunk("b", [6, 7], 3, [3], sample=True, num_spec_tokens=1)):  # verifying a draft
        assert not is_plain_decode(SchedulerOutput(chunks=[decode, other]))
    graphs = DecodeGraphs([1, 2, 4], pad_block=PAD_BLOCK)
    assert graphs.pad_to(SchedulerOutput(chunks=[decode] * 3)) == 4
    assert graphs.pad_to(SchedulerOutput(chunks=[decode] * 5)) is None  # past the largest size: eager


def _decode_step(batch: InputBatch, pad_to: int, *chunks: ScheduledChunk):
    return batch.prepare(SchedulerOutput(chunks=list(chunks)), pad_to=pad_to, pad_block=PAD_BLOCK)


def test_padding_rows_see_and_write_only_the_scratch_block() -> None:
    batch = InputBatch(max_num_tokens=16, max_blocks_per_request=3, block_size=BLOCK, device=torch.device("cpu"),
                       max_graph_batch=4)
    inputs = _decode_step(batch, 4, ScheduledChunk("a", [11], 5, [7, 2], sample=True),
                          ScheduledChunk("b", [21], 2, [5], sample=True))
    padded = inputs.padded
    assert padded is not None and (padded.size, padded.num_real) == (4, 2)
    assert padded.input_ids.tolist() == [11, 21, 0, 0]
    assert padded.positions.tolist() == [5, 2, 0, 0]
    assert padded.attention.slot_mapping.tolist() == [9, 22, 36, 36]  # padding: block 9, offset 0
    assert padded.attention.block_tables.tolist() == [[7, 2, 9], [5, 9, 9], [9, 9, 9], [9, 9, 9]]
    assert padded.attention.seq_lens_device.tolist() == [6, 3, 1, 1]
    assert padded.attention.seq_lens.tolist() == [6, 3, 1, 1]
    assert padded.attention.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    # The step itself is what it would be without padding, in the same memory as the padded rows.
    assert inputs.input_ids.tolist() == [11, 21] and inputs.attention.slot_mapping.tolist() == [9, 22]
    assert inputs.attention.seq_lens.tolist() == [6, 3] and inputs.logits_indices is None
    assert inputs.input_ids.data_ptr() == padded.input_ids.data_ptr()


def test_a_smaller_step_at_the_same_size_leaves_no_stale_rows_and_the_same_addresses() -> None:
    batch = InputBatch(max_num_tokens=16, max_blocks_per_request=3, block_size=BLOCK, device=torch.device("cpu"),
                       max_graph_batch=4)
    first = _decode_step(batch, 4, *(ScheduledChunk(r, [1], 5, [b, b + 1], sample=True) for r, b in
                                     (("a", 1), ("b", 3), ("c", 5)))).padded
    second = _decode_step(batch, 4, ScheduledChunk("a", [2], 6, [1, 2], sample=True)).padded
    assert first is not None and second is not None
    # Rows 1 and 2 held b and c last step: a replay must not write their slots or read their blocks again.
    assert second.attention.slot_mapping.tolist() == [10, 36, 36, 36]
    assert second.attention.block_tables.tolist() == [[1, 2, 9], [9, 9, 9], [9, 9, 9], [9, 9, 9]]
    assert second.attention.seq_lens_device.tolist() == [7, 1, 1, 1]
    for old, new in ((first.input_ids, second.input_ids), (first.positions, second.positions),
                     (first.attention.slot_mapping, second.attention.slot_mapping),
                     (first.attention.block_tables, second.attention.block_tables),
                     (first.attention.seq_lens_device, second.attention.seq_lens_device)):
        assert (old.data_ptr(), old.shape) == (new.data_ptr(), new.shape)


def test_prefill_chunks_are_not_padded() -> None:
    batch = InputBatch(max_num_tokens=16, max_blocks_per_request=3, block_size=BLOCK, device=torch.device("cpu"),
                       max_graph_batch=4)
    assert _decode_step(batch, 4, ScheduledChunk("a", [1, 2, 3], 0, [1], sample=True)).padded is None


class EagerCapture:
    """Stands in for torch.cuda graphs: 'replays' by running the captured forward again on the step."""

    def __init__(self) -> None:
        self.captured: list[int] = []
        self.replays: Counter[int] = Counter()

    def __call__(self, run: Callable[[PaddedStep], torch.Tensor], step: PaddedStep) -> EagerCapture.Replay:
        self.captured.append(step.size)
        return EagerCapture.Replay(self, run, run(step).clone())

    class Replay:
        def __init__(self, owner: EagerCapture, run: Callable[[PaddedStep], torch.Tensor], output: torch.Tensor):
            self.owner, self.run, self.output = owner, run, output

        def replay(self, step: PaddedStep) -> None:
            self.owner.replays[step.size] += 1
            self.output.copy_(self.run(step))


def test_replay_refuses_a_step_laid_out_elsewhere() -> None:
    graphs = DecodeGraphs([2], pad_block=PAD_BLOCK)
    capture = EagerCapture()
    batch = InputBatch(max_num_tokens=8, max_blocks_per_request=2, block_size=BLOCK, device=torch.device("cpu"),
                       max_graph_batch=2)

    def make(size: int) -> PaddedStep:
        step = _decode_step(batch, size, ScheduledChunk("x", [0], 0, [PAD_BLOCK], sample=True)).padded
        assert step is not None
        return step

    graphs.capture(lambda ids, positions: ids.float()[:, None].repeat(1, 3), make, capture)
    moved = make(2)
    moved.input_ids = moved.input_ids.clone()  # same values, other memory: a graph would read stale inputs
    with pytest.raises(RuntimeError, match="not laid out where its graph was captured"):
        graphs.replay(moved)
    assert graphs.replay(make(2)).tolist() == [[0.0] * 3]  # one real row of two


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.checkpoints import make_checkpoint

    return make_checkpoint("llama", tmp_path_factory.mktemp("graphs"))


def _greedy(model: Path, graphs: EagerCapture | None, monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    from tokenmill.llm import LLM
    from tokenmill.sampling_params import SamplingParams

    with monkeypatch.context() as patch:
        if graphs is not None:
            patch.setattr("tokenmill.worker.worker.graphs_usable", lambda *args: True)
            patch.setattr("tokenmill.worker.worker.capture_cuda_graph", lambda: graphs)
        llm = LLM(str(model), dtype="float32", max_num_seqs=6, num_kv_blocks=64, max_model_len=256)
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(8, 512, size=n).tolist()} for n in (3, 17, 5, 30, 9)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (12, 4, 20, 7, 9)]
    return [out.outputs[0].token_ids for out in llm.generate(prompts, params)]


@pytest.mark.usefixtures("one_torch_thread")
def test_engine_decoding_through_padded_graph_steps_gives_the_eager_tokens(tiny_model: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    capture = EagerCapture()
    assert _greedy(tiny_model, capture, monkeypatch) == _greedy(tiny_model, None, monkeypatch)
    assert capture.captured == [6, 4, 2, 1]  # largest first
    # Five requests finishing at different lengths decode at 5, 4, 3, 2 and 1 live requests: padded to 6, 4, 2, 1.
    assert set(capture.replays) == {6, 4, 2, 1}


def test_graphs_need_cuda_a_capturable_backend_and_no_enforce_eager() -> None:
    from types import SimpleNamespace

    from tokenmill.worker.cuda_graphs import graphs_usable

    from tokenmill.layers.moe import FusedExperts

    capturable, plain = SimpleNamespace(supports_cuda_graphs=True), SimpleNamespace(supports_cuda_graphs=False)
    cuda, dense = torch.device("cuda"), torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert graphs_usable(cuda, False, capturable, dense)
    assert not graphs_usable(cuda, True, capturable, dense)
    assert not graphs_usable(cuda, False, plain, dense)
    assert not graphs_usable(torch.device("cpu"), False, capturable, dense)
    # Mixture-of-experts layers size their matmuls from counts read on the host: never captured.
    moe = torch.nn.Sequential(torch.nn.Linear(2, 2), FusedExperts(4, 8, 16, torch.float32, torch.device("cpu")))
    assert not graphs_usable(cuda, False, capturable, moe)


def test_enforce_eager_wins_over_compile(tiny_model: Path) -> None:
    from tokenmill.llm import LLM

    llm = LLM(str(tiny_model), dtype="float32", compile=True, enforce_eager=True, num_kv_blocks=64, max_model_len=256)
    assert llm.engine.worker.compile is False and llm.engine.worker.runner.graphs is None
