"""Threads with a deep stack for llguidance's grammar compiler, which recurses once per level of a grammar.

A chain of rules or `$ref`s (`a1: a2 "x"`, `a2: a3 "x"`, ...) is shallow as text and JSON, yet llguidance's
compiler recurses along it: on a thread's usual 8 MiB stack some 1,500 `$ref`s or 3,000 Lark rules overflow it
and the whole process dies (SIGSEGV), taking every other request with it. On a 512 MiB stack the largest
grammar the size limits let in (1 MiB of text) compiles or is refused by llguidance's own limits (grammar
size, symbol count). The stack is reserved address space: only the pages a compile touches are backed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

DEEP_STACK_BYTES = 512 << 20
_stack_size_lock = threading.Lock()  # threading.stack_size is process-wide: set it only around our starts


class DeepStackPool:
    """A few long-lived threads with a deep stack; `run` executes a call on one of them and waits for it."""

    def __init__(self, num_threads: int, name: str, stack_bytes: int = DEEP_STACK_BYTES) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Future[Any]]] = queue.SimpleQueue()
        with _stack_size_lock:
            previous = threading.stack_size(stack_bytes)
            try:
                for index in range(num_threads):
                    threading.Thread(target=self._serve, name=f"{name}-{index}", daemon=True).start()
            finally:
                threading.stack_size(previous)

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        done: Future[T] = Future()
        self._calls.put((fn, args, done))
        return done.result()

    def _serve(self) -> None:
        while True:
            fn, args, done = self._calls.get()
            try:
                done.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who raises it
                done.set_exception(exc)
