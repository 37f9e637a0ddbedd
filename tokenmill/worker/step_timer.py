"""Time forward passes of synthetic batches, for the speculative-decoding cost model.

Runs before any request exists, so the synthetic batch may write its KV into scratch blocks freely.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from tokenmill.attention.metadata import build_attention_metadata, forward_context


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_forward(
    model: nn.Module, num_seqs: int, tokens_per_seq: int, block_size: int, device: torch.device, repeats: int = 3,
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Median seconds of a forward over num_seqs sequences of tokens_per_seq tokens (and their logits)."""
    num_blocks_each = -(-tokens_per_seq // block_size)
    tables = [list(range(num_blocks_each)) for _ in range(num_seqs)]  # all share scratch blocks 0..
    metadata = build_attention_metadata([0] * num_seqs, [tokens_per_seq] * num_seqs, tables, block_size, device)
    num_tokens = num_seqs * tokens_per_seq
    input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    positions = torch.arange(tokens_per_seq, device=device).repeat(num_seqs)
    last = torch.arange(tokens_per_seq - 1, num_tokens, tokens_per_seq, device=device)
    run_model = forward or model.forward

    def run() -> None:
        metadata.plans.clear()
        with forward_context(metadata):
            hidden = run_model(input_ids, positions)
        model.compute_logits(hidden[last])

    return _median_seconds(run, device, repeats)


def _median_seconds(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)
