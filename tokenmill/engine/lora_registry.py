"""The engine's LoRA adapters by name; a request names its adapter in its prompt dict ("lora_name").

Names map to adapters read and checked by the worker's LoRAManager. Requests carry the adapter's identity (a
hash of its files), which keys both its slot (core/lora_slots.py) and its KV (core/prefix_cache.py). An
adapter in use by an unfinished request cannot be removed; one removed while no request uses it is forgotten.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tokenmill.errors import InvalidRequestError
from tokenmill.lora.adapter import PeftAdapter
from tokenmill.lora.manager import LoRAManager

LORA_NAME_KEY = "lora_name"  # the prompt dict's key, as "cache_salt" is


class LoRARegistry:
    def __init__(self, manager: LoRAManager | None, in_use: Callable[[str], bool]) -> None:
        self.manager = manager
        self._in_use = in_use  # identity -> whether an unfinished request uses it
        self._by_name: dict[str, PeftAdapter] = {}

    @property
    def enabled(self) -> bool:
        return self.manager is not None

    def names(self) -> list[str]:
        return list(self._by_name)

    def read(self, path: str, field: str = "lora_path") -> PeftAdapter:
        """Read and check an adapter folder (any thread; registers nothing)."""
        return self._manager(field).read(path, field)

    def add(self, name: str, adapter: PeftAdapter, field: str = "lora_name") -> None:
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(field, f"must be a non-empty adapter name, got {name!r}")
        if name in self._by_name:
            raise InvalidRequestError(field, f"an adapter named {name!r} is already loaded")
        self._manager(field).register(adapter)
        self._by_name[name] = adapter

    def load(self, name: str, path: str) -> None:
        self.add(name, self.read(path))

    def remove(self, name: str, field: str = "lora_name") -> None:
        adapter = self._by_name.get(name)
        if adapter is None:
            raise InvalidRequestError(field, f"no adapter named {name!r} is loaded{self._loaded()}")
        shared = any(other is not adapter and other.identity == adapter.identity for other in self._by_name.values())
        if not shared and self._in_use(adapter.identity):
            raise InvalidRequestError(field, f"adapter {name!r} is in use by unfinished requests; retry when they end")
        del self._by_name[name]
        if not shared:
            self._manager(field).unregister(adapter.identity)

    def identity_for(self, prompt: Any) -> str | None:
        """The identity of the adapter a prompt names (None: the base model); an unknown name raises."""
        name = prompt.get(LORA_NAME_KEY) if isinstance(prompt, dict) else None
        if name is None:
            return None
        self._manager(LORA_NAME_KEY)
        adapter = self._by_name.get(name) if isinstance(name, str) else None
        if adapter is None:
            raise InvalidRequestError(LORA_NAME_KEY, f"no adapter named {name!r} is loaded{self._loaded()}")
        return adapter.identity

    def _manager(self, field: str) -> LoRAManager:
        if self.manager is None:
            raise InvalidRequestError(field, "LoRA adapters are not enabled on this engine (enable_lora, "
                                             "--enable-lora)")
        return self.manager

    def _loaded(self) -> str:
        return f" (loaded: {', '.join(self._by_name)})" if self._by_name else " (none is loaded)"
