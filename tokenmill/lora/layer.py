"""One linear layer's LoRA: stacked A/B buffers with a slot per resident adapter, added to the base output.

A fused layer (q/k/v, gate/up) has one output slice per projection it fuses; each slice has its own A and B
(PEFT adapts q_proj, k_proj and v_proj separately), so the buffers are [slices, slots, rank, in] and
[slices, slots, rank, widest slice]. The layer's quant method is untouched: the delta is added to whatever it
computed. Which slot each token of the step uses comes from the step's context (`step_token_slots`), set by
the model runner around the forward; outside it (profiling, warm-up) no adapter applies.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from tokenmill.kernels import reference
from tokenmill.kernels.dispatch import use_triton_kernels

# Per token of the running step: the slot of its request's adapter, -1 for the base model; None: no adapter.
_TOKEN_SLOTS: ContextVar[torch.Tensor | None] = ContextVar("lora_token_slots", default=None)


@contextmanager
def step_token_slots(token_slots: torch.Tensor | None) -> Iterator[None]:
    """The adapters of the step's tokens, for every LoRA layer the forward inside runs through."""
    reset = _TOKEN_SLOTS.set(token_slots)
    try:
        yield
    finally:
        _TOKEN_SLOTS.reset(reset)


class LoRALayer:
    def __init__(self, in_features: int, slices: Sequence[tuple[int, int]], max_loras: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.in_features = in_features
        self.slices = [tuple(s) for s in slices]  # (offset, size) of each fused projection in the output
        width = max(size for _, size in slices)
        self.lora_a = torch.zeros(len(slices), max_loras, max_rank, in_features, dtype=dtype, device=device)
        self.lora_b = torch.zeros(len(slices), max_loras, max_rank, width, dtype=dtype, device=device)

    def add_to(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (the base layer's output for x) plus each token's adapter delta."""
        token_slots = _TOKEN_SLOTS.get()
        if token_slots is None:
            return out
        flat_x, flat_out = x.reshape(-1, self.in_features), out.reshape(-1, out.shape[-1])
        if flat_x.shape[0] != token_slots.shape[0]:
            raise RuntimeError(f"LoRA: {flat_x.shape[0]} tokens in the layer, {token_slots.shape[0]} token slots "
                               f"in the step")
        apply = reference.lora_shrink_expand
        if use_triton_kernels(flat_x):
            from tokenmill.kernels.triton_lora import lora_shrink_expand as apply
        apply(flat_out, flat_x, self.lora_a, self.lora_b, token_slots, self.slices)
        return out

    def clear_slot(self, slot: int) -> None:
        self.lora_a[:, slot].zero_()
        self.lora_b[:, slot].zero_()

    def write_slot(self, slot: int, piece: int, a: torch.Tensor, scaled_b: torch.Tensor) -> None:
        """One projection's A [r, in] and scaled B [size, r] into the slot (ranks below the maximum: the rest
        of the slot stays zero)."""
        rank = a.shape[0]
        self.lora_a[piece, slot, :rank].copy_(a)
        self.lora_b[piece, slot, :rank, : scaled_b.shape[0]].copy_(scaled_b.T)
