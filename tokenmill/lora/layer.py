"""One linear layer's LoRA: stacked A/B buffers with a slot per resident adapter, added to the base output.

A fused layer (q/k/v, gate/up) has one output slice per projection it fuses; each slice has its own A and B
(PEFT adapts q_proj, k_proj and v_proj separately), so the buffers are A [slots, slices, rank, in] and
B [slots, slices, rank, widest slice] (the layout of reference.lora_shrink_expand). The layer's quant method is
untouched: the delta is added to whatever it computed. Which slot each token of the step uses comes from the
step's context (`step_token_slots`), set by the model runner around the forward; outside it (profiling,
warm-up) no adapter applies.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from tokenmill.kernels import reference
from tokenmill.kernels.dispatch import use_triton_kernels


class StepSlots:
    """Per token of the running step: the slot of its request's adapter, -1 for the base model; and, computed
    once for all the layers, those tokens grouped by slot (what the torch twin runs on)."""

    def __init__(self, token_slots: torch.Tensor) -> None:
        self.token_slots = token_slots
        self._groups: dict[int, reference.LoRATokenGroups | None] = {}

    def groups(self, num_slots: int) -> reference.LoRATokenGroups | None:
        if num_slots not in self._groups:
            self._groups[num_slots] = reference.lora_token_groups(self.token_slots, num_slots)
        return self._groups[num_slots]


_STEP: ContextVar[StepSlots | None] = ContextVar("lora_step_slots", default=None)  # None: no adapter this step


@contextmanager
def step_token_slots(token_slots: torch.Tensor | None) -> Iterator[None]:
    """The adapters of the step's tokens, for every LoRA layer the forward inside runs through."""
    reset = _STEP.set(None if token_slots is None else StepSlots(token_slots))
    try:
        yield
    finally:
        _STEP.reset(reset)


class LoRALayer:
    def __init__(self, in_features: int, slices: Sequence[tuple[int, int]], max_loras: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.in_features = in_features
        self.slices = [tuple(s) for s in slices]  # (offset, size) of each fused projection in the output
        width = max(size for _, size in slices)
        self.lora_a = torch.zeros(max_loras, len(slices), max_rank, in_features, dtype=dtype, device=device)
        self.lora_b = torch.zeros(max_loras, len(slices), max_rank, width, dtype=dtype, device=device)

    def add_to(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (the base layer's output for x) plus each token's adapter delta."""
        step = _STEP.get()
        if step is None:
            return out
        flat_x, flat_out = x.reshape(-1, self.in_features), out.reshape(-1, out.shape[-1])
        if flat_x.shape[0] != step.token_slots.shape[0]:
            raise RuntimeError(f"LoRA: {flat_x.shape[0]} tokens in the layer, {step.token_slots.shape[0]} token "
                               f"slots in the step")
        if use_triton_kernels(flat_x):
            from tokenmill.kernels.triton_lora import lora_shrink_expand

            lora_shrink_expand(flat_out, flat_x, self.lora_a, self.lora_b, step.token_slots, self.slices)
        else:
            reference.lora_shrink_expand(flat_out, flat_x, self.lora_a, self.lora_b, step.token_slots, self.slices,
                                         step.groups(self.lora_a.shape[0]))
        return out

    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()

    def write_slot(self, slot: int, piece: int, a: torch.Tensor, scaled_b: torch.Tensor) -> None:
        """One projection's A [r, in] and scaled B [size, r] into the slot (ranks below the maximum: the rest
        of the slot stays zero)."""
        rank = a.shape[0]
        self.lora_a[slot, piece, :rank].copy_(a)
        self.lora_b[slot, piece, :rank, : scaled_b.shape[0]].copy_(scaled_b.T)
