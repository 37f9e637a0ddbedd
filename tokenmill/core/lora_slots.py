"""Which LoRA adapter is resident in which of the worker's `max_loras` slots, evicted least recently used.

Adapters are named by identity (a hash of their files), so an adapter unregistered and registered again
finds its weights still in the slot. The scheduler admits a request only while the running requests use at
most `max_loras` distinct adapters, so one step never needs more slots than there are; `place` gives each
chunk its slot and says which slots the worker must fill before the step runs.
"""

from __future__ import annotations

from collections import OrderedDict

from tokenmill.core.request import Request
from tokenmill.core.sched_io import ScheduledChunk

BASE_MODEL_SLOT = -1  # a chunk of a request without an adapter


class LoRASlots:
    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # identity -> slot, least recently used first
        self._free = list(range(max_loras - 1, -1, -1))
        self.num_loads = 0  # adapters placed into a slot so far (each one the worker copies in)

    def fits(self, lora_id: str | None, active: set[str]) -> bool:
        """Whether a request of this adapter may join running requests that use the `active` adapters."""
        return lora_id is None or lora_id in active or len(active) < self.max_loras

    def place(self, chunks: list[ScheduledChunk], requests: dict[str, Request]) -> dict[int, str]:
        """Set each chunk's lora_slot; the slots to fill before the step (slot -> identity)."""
        wanted = [requests[chunk.req_id].lora_id for chunk in chunks]
        in_step = {identity for identity in wanted if identity is not None}
        if len(in_step) > self.max_loras:
            raise RuntimeError(f"a step needs {len(in_step)} LoRA adapters; only {self.max_loras} slots exist")
        loads: dict[int, str] = {}
        for identity in dict.fromkeys(i for i in wanted if i is not None):
            if identity in self._slot_of:
                self._slot_of.move_to_end(identity)
                continue
            if not self._free:  # evict the least recently used adapter this step does not use
                victim = next(i for i in self._slot_of if i not in in_step)
                self._free.append(self._slot_of.pop(victim))
            slot = self._free.pop()
            self._slot_of[identity] = slot
            loads[slot] = identity
            self.num_loads += 1
        for chunk, identity in zip(chunks, wanted):
            chunk.lora_slot = BASE_MODEL_SLOT if identity is None else self._slot_of[identity]
        return loads
