"""Request bodies decoded off the event loop.

FastAPI decodes a JSON body with `json.loads` on the event loop: ~5 ms of loop time per 4 MB body (bytes to
str, then the scan), during which no other client is answered. Bodies over OFF_LOOP_BYTES are decoded on the
engine's preparation pool instead (FastAPI's documented custom-route hook), so /health and streams keep their
latency while large prompts arrive; small bodies stay on the loop, where a thread hop would cost more than it saves.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

OFF_LOOP_BYTES = 64 << 10


class OffLoopJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            if len(body) > OFF_LOOP_BYTES:
                self._json = await self.app.state.tokenmill.engine.run_prepare(json.loads, body)
            else:
                self._json = json.loads(body)
        return self._json


class OffLoopJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def decode_off_loop(request: Request) -> Response:
            return await handler(OffLoopJSONRequest(request.scope, request.receive))

        return decode_off_loop
