"""uvicorn's h11 protocol with the two guards an exposed server needs, and the uvicorn config that uses it.

- A request's headers must arrive within `timeout_headers` seconds of the connection opening (or of the
  previous response): uvicorn's keep-alive timer restarts on every received byte, so a client sending one
  header byte at a time (slowloris) would hold a connection forever.
- Responses go out without Nagle's delay: uvicorn writes the status line and the body separately, and on a
  socket without TCP_NODELAY the second write waits for the client's delayed ACK (~40 ms a response on
  keep-alive connections).

And the process hands the interpreter lock around every millisecond instead of every 5: preparation threads
run Python (chat templates) for up to their budget, and the event loop needs the lock back for each step of
answering a request; at 5 ms a step, /health took ~100 ms beside a heavy template, at 1 ms ~20 ms (measured).
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_TIMEOUT_HEADERS_S = 10.0
DEFAULT_TIMEOUT_KEEP_ALIVE_S = 5
SWITCH_INTERVAL_S = 0.001


class GuardedH11Protocol(H11Protocol):
    timeout_headers: float = DEFAULT_TIMEOUT_HEADERS_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._headers_deadline: asyncio.TimerHandle | None = None
        self._arm_headers_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request line and headers are complete
            self._disarm_headers_deadline()
        elif self._headers_deadline is None:  # a new request starts arriving on a kept-alive connection
            self._arm_headers_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_headers_deadline()
        super().connection_lost(exc)

    def _arm_headers_deadline(self) -> None:
        self._headers_deadline = self.loop.call_later(self.timeout_headers, self._headers_timed_out)

    def _disarm_headers_deadline(self) -> None:
        if self._headers_deadline is not None:
            self._headers_deadline.cancel()
            self._headers_deadline = None

    def _headers_timed_out(self) -> None:
        self._headers_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that drains the engine before uvicorn closes connections: requests still running at the
    drain deadline are aborted by the engine, so their streams end with a final event (finish_reason "abort",
    then [DONE]) and complete on their own, instead of being cut when uvicorn's graceful timeout expires."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._drain = drain

    async def shutdown(self, sockets: Any = None) -> None:
        await self._drain()
        await super().shutdown(sockets=sockets)


def uvicorn_config(app: Any, timeout_headers: float = DEFAULT_TIMEOUT_HEADERS_S,
                   timeout_keep_alive: int = DEFAULT_TIMEOUT_KEEP_ALIVE_S, **kwargs: Any) -> uvicorn.Config:
    """uvicorn.Config serving `app` with GuardedH11Protocol (kwargs go to uvicorn.Config); sets this serving
    process's interpreter switch interval (see the module docstring)."""
    if timeout_headers <= 0:
        raise ValueError(f"timeout_headers must be > 0, got {timeout_headers}")
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    protocol = type("GuardedH11Protocol", (GuardedH11Protocol,), {"timeout_headers": timeout_headers})
    return uvicorn.Config(app, http=protocol, timeout_keep_alive=timeout_keep_alive, **kwargs)
