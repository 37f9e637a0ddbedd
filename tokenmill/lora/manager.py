"""The model's LoRA layers, the registered adapters and what sits in each resident slot.

Every linear layer whose projections PEFT can target (q/k/v/o, gate/up/down) gets a LoRALayer. Registered
adapters are checked against the model and kept in host memory; `max_loras` of them are resident in the
layers' slot buffers. The scheduler (core/lora_slots.py) picks which adapter goes to which slot, evicting
the least recently used, and each step says which slots to (re)fill before it runs (`load_slots`).
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.errors import InvalidRequestError
from tokenmill.layers.linear import LinearBase, LMHead
from tokenmill.lora.adapter import PeftAdapter, load_peft_adapter
from tokenmill.lora.layer import LoRALayer

# Projection names (PEFT's target_modules spelling, the checkpoint's) that adapters may target.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRAManager:
    def __init__(self, model: nn.Module, max_loras: int, max_lora_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.device = device
        # PEFT module name -> (its layer's LoRA, which output slice of it)
        self.targets: dict[str, tuple[LoRALayer, int]] = {}
        self.layers: list[LoRALayer] = []
        packed: dict[str, list[tuple[str, str]]] = getattr(model, "packed_modules", {})
        for path, module in model.named_modules():
            if not isinstance(module, LinearBase) or isinstance(module, LMHead):
                continue
            prefix, _, leaf = path.rpartition(".")
            parts = [(name, module.shards[shard]) for name, shard in packed[leaf]] if leaf in packed \
                else [(leaf, (0, module.output_size))]
            if not all(name in TARGET_MODULES for name, _ in parts):
                continue
            lora = LoRALayer(module.input_size, [s for _, s in parts], max_loras, max_lora_rank, dtype, device)
            module.lora = lora
            self.layers.append(lora)
            for piece, (name, _) in enumerate(parts):
                self.targets[f"{prefix}.{name}" if prefix else name] = (lora, piece)
        self.adapters: dict[str, PeftAdapter] = {}  # identity -> adapter, registered
        self.resident: dict[int, str] = {}  # slot -> identity of the adapter in it

    def read(self, path: str, field: str = "lora_path") -> PeftAdapter:
        """Read an adapter and check it fits this model (any thread; nothing changes). Errors name `field`."""
        adapter = load_peft_adapter(path, field)
        if adapter.rank > self.max_lora_rank:
            raise InvalidRequestError(field, f"{path}: rank {adapter.rank} exceeds max_lora_rank "
                                             f"{self.max_lora_rank}")
        for name, (a, b) in adapter.modules.items():
            target = self.targets.get(name)
            if target is None:
                raise InvalidRequestError(field, f"{path}: targets {name}, which this model has no LoRA-capable "
                                                 f"projection for (supported: {', '.join(TARGET_MODULES)})")
            layer, piece = target
            want = (layer.in_features, layer.slices[piece][1])
            if (a.shape[1], b.shape[0]) != want:
                raise InvalidRequestError(field, f"{path}: {name} maps {a.shape[1]} -> {b.shape[0]} features; this "
                                                 f"model's maps {want[0]} -> {want[1]} (an adapter of another "
                                                 f"base model?)")
        return adapter

    def register(self, adapter: PeftAdapter) -> None:
        """Keep a read adapter, so the scheduler may place it in a slot; until `unregister`."""
        self.adapters[adapter.identity] = adapter

    def unregister(self, identity: str) -> None:
        self.adapters.pop(identity, None)

    def load_slots(self, loads: dict[int, str]) -> None:
        """Fill slots with registered adapters (slot -> identity), replacing whatever they held."""
        for slot, identity in loads.items():
            if not 0 <= slot < self.max_loras:
                raise ValueError(f"LoRA slot {slot} is outside [0, {self.max_loras})")
            adapter = self.adapters[identity]
            for layer in self.layers:
                layer.clear_slot(slot)
            for name, (a, b) in adapter.modules.items():
                layer, piece = self.targets[name]
                layer.write_slot(slot, piece, a, b)
            self.resident[slot] = identity
