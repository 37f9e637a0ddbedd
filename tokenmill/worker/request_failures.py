"""Per-request failures inside a step: recorded against the one request, never raised, so the step goes on
for every other request in the batch.

The worker guards each request's own work with `RequestFailures.guard` (creating its sampling state, its
grammar mask, its thinking budget, recording its tokens); a request that fails is left out of the rest of
the step and reported in ModelRunnerOutput.failed, and the engine aborts it with its own error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from tokenmill.errors import InvalidRequestError

logger = logging.getLogger(__name__)


class RequestFailures:
    def __init__(self) -> None:
        # req id -> (request field at fault or None for an engine fault, message about this request only)
        self.failed: dict[str, tuple[str | None, str]] = {}

    def __contains__(self, req_id: object) -> bool:
        return req_id in self.failed

    @contextmanager
    def guard(self, req_id: str) -> Iterator[None]:
        """Run one request's own work; an exception fails that request and is swallowed here."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - any failure of this request's work is this request's alone
            self.record(req_id, exc)

    def record(self, req_id: str, exc: BaseException) -> None:
        if req_id in self.failed:
            return
        if isinstance(exc, InvalidRequestError):
            self.failed[req_id] = (exc.field, str(exc))
        else:
            logger.error("request %s failed inside a step; aborting it alone", req_id, exc_info=exc)
            self.failed[req_id] = (None, f"the engine failed while generating this request ({type(exc).__name__})")
