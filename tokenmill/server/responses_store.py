"""Stored responses: what `previous_response_id`, `GET` and `DELETE /v1/responses/{id}` read, kept in memory.

Bounded three ways (--responses-max-stored, --responses-max-bytes, --responses-ttl): the oldest go first when a
bound is reached, and an entry past its time to live is gone. Each entry belongs to the API key that created it
(its key id, server/auth.py); another key is told the id does not exist, in the same words as for an id that
never did, so ids cannot be probed across keys. Accessed from the event loop only, so there is no lock.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokenmill.server.errors import APIError

DEFAULT_MAX_STORED = 1000
DEFAULT_MAX_BYTES = 64 << 20
DEFAULT_TTL_S = 3600.0


@dataclass
class StoredResponse:
    owner: str | None  # the key id of the API key that created it; None when the server has no keys
    body: dict[str, Any]  # the response object as it was returned
    # The chain's input items so far (without instructions, which do not carry over) and this response's
    # output items: what a later request's previous_response_id puts before its own input.
    conversation: list[dict[str, Any]]
    conversation_bytes: int
    size: int
    expires_at: float


def json_bytes(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False).encode("utf-8"))


class ResponseStore:
    def __init__(self, max_responses: int = DEFAULT_MAX_STORED, max_bytes: int = DEFAULT_MAX_BYTES,
                 ttl_s: float = DEFAULT_TTL_S, clock: Callable[[], float] = time.monotonic) -> None:
        if max_responses < 0:
            raise ValueError(f"--responses-max-stored must be >= 0, got {max_responses}")
        if max_bytes < 0:
            raise ValueError(f"--responses-max-bytes must be >= 0, got {max_bytes}")
        if not ttl_s > 0:
            raise ValueError(f"--responses-ttl must be > 0 seconds, got {ttl_s}")
        self.max_responses = max_responses
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()  # oldest first: expiry order too
        self.total_bytes = 0
        # Background responses still generating, by id: cancel and delete stop them.
        self.running: dict[str, asyncio.Task[None]] = {}

    def __len__(self) -> int:
        self._expire()
        return len(self._entries)

    def put(self, response_id: str, owner: str | None, body: dict[str, Any], history: StoredResponse | None,
            new_items: list[dict[str, Any]]) -> bool:
        """Store a response; history is the entry its previous_response_id named. False when it alone is over
        the byte bound (or the count bound is 0), so nothing was stored."""
        self._expire()
        earlier = history.conversation if history is not None else []
        conversation_bytes = (history.conversation_bytes if history is not None else 0) + json_bytes(new_items)
        size = conversation_bytes + json_bytes(body)
        if size > self.max_bytes or self.max_responses == 0:
            return False
        self._remove(response_id)
        while self._entries and (len(self._entries) >= self.max_responses or self.total_bytes + size > self.max_bytes):
            self._remove(next(iter(self._entries)))
        self._entries[response_id] = StoredResponse(owner, body, earlier + new_items, conversation_bytes, size,
                                                    self._clock() + self.ttl_s)
        self.total_bytes += size
        return True

    def get(self, response_id: str, owner: str | None, param: str | None = None) -> StoredResponse:
        """The entry, or a 404 that reads the same whether the id never existed or is another key's."""
        self._expire()
        entry = self._entries.get(response_id)
        if entry is None or entry.owner != owner:
            raise APIError(404, f"no stored response has the id {response_id[:100]!r} (responses are kept in "
                           f"memory for {self.ttl_s:g} s, for the API key that created them; store=false responses "
                           "are not kept)", type_="not_found_error", param=param, code="response_not_found")
        return entry

    def holds(self, response_id: str) -> bool:
        """Whether the id is still stored (not deleted, evicted or expired), whoever owns it."""
        self._expire()
        return response_id in self._entries

    def delete(self, response_id: str, owner: str | None) -> None:
        self.get(response_id, owner)
        self._remove(response_id)
        task = self.running.pop(response_id, None)
        if task is not None:
            task.cancel()

    def _remove(self, response_id: str) -> None:
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self.total_bytes -= entry.size

    def _expire(self) -> None:
        now = self._clock()
        while self._entries:
            oldest_id, oldest = next(iter(self._entries.items()))
            if oldest.expires_at > now:
                break
            self._remove(oldest_id)
