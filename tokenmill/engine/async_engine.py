"""AsyncLLMEngine: one LLMEngine driven by a background thread, consumed from asyncio.

Only the loop thread ever changes the LLMEngine. A request is first checked by the engine's stateless
`validate_request` (tokens, sampling values, grammar compilation) on a small preparation pool, so neither
the event loop nor the step loop waits on one request's expensive checks and a request that cannot run is
refused before it is queued. Callers talk to the loop through a command queue (add, abort),
applied between steps, and receive outputs on a per-request asyncio queue fed with
`loop.call_soon_threadsafe`. A slow consumer gets the outputs queued meanwhile as one: the newest of
cumulative outputs, or the merge of delta outputs.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from tokenmill.errors import RequestFailedError, TokenmillError
from tokenmill.outputs import CompletionOutput, RequestOutput, merge_deltas
from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:  # the loop only needs the engine's methods; keeps this module light to import
    from tokenmill.engine.engine import LLMEngine, PromptInput

logger = logging.getLogger(__name__)

T = TypeVar("T")
PREPARE_WORKERS = 4
# Outputs a request may have waiting for its consumer. A consumer that reads at all takes everything queued
# at once (merged), so only one that stopped reading reaches this: its request is then aborted.
DEFAULT_MAX_UNREAD_OUTPUTS = 1024


class EngineOverloadedError(TokenmillError):
    """The waiting queue is full (`max_queue`) or the engine is shutting down: retry later (HTTP 503)."""


@dataclass
class _Stream:
    request_id: str
    loop: asyncio.AbstractEventLoop
    kind: str = "cumulative"  # the request's SamplingParams.output_kind
    n: int = 1
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)
    # Loop thread only, to finish the request on abort: the newest output sent, and (delta) the samples
    # whose finish already went out.
    last: RequestOutput | None = None
    finished_samples: set[int] = field(default_factory=set)
    added_at: float = field(default_factory=time.monotonic)
    # Outputs put (loop thread) and taken (consumer): each counter has one writer, so their difference is
    # what sits unread without a lock.
    sent: int = 0
    taken: int = 0

    def record(self, output: RequestOutput) -> None:
        self.last = output
        if self.kind == "delta":
            self.finished_samples.update(c.index for c in output.outputs if c.finished)

    def put(self, item: RequestOutput | BaseException) -> None:
        self.sent += 1
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
            pass

    @property
    def unread(self) -> int:
        return self.sent - self.taken

    def overflow(self, error: BaseException) -> None:
        """Drop what the consumer never read and leave only the error: the buffer is freed at once."""
        def replace_all() -> None:
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(error)

        try:
            self.loop.call_soon_threadsafe(replace_all)
        except RuntimeError:
            pass


class RequestStream:
    """Async iterator over one request's outputs (of its output_kind); leaving it early aborts the request."""

    def __init__(self, engine: "AsyncLLMEngine", stream: _Stream) -> None:
        self._engine = engine
        self._stream = stream
        self.request_id = stream.request_id
        self.finished = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            items = [await self._stream.queue.get()]
            # Coalesce what queued up meanwhile (an error ends the stream, so it wins).
            while not self._stream.queue.empty() and not isinstance(items[-1], BaseException):
                items.append(self._stream.queue.get_nowait())
            self._stream.taken += len(items)
        except BaseException:
            self.abort()  # cancelled (client went away): free the request's KV blocks
            raise
        last = items[-1]
        if isinstance(last, BaseException):
            self.finished = True
            raise last
        # Cumulative outputs: the newest holds everything. Deltas: each holds a part, so all are merged.
        output = merge_deltas(items) if self._stream.kind == "delta" else last  # type: ignore[arg-type]
        self.finished = output.finished
        return output

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.abort()


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_queue: int | None = None,
                 max_unread_outputs: int = DEFAULT_MAX_UNREAD_OUTPUTS) -> None:
        if max_queue is not None and max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if max_unread_outputs < 1:
            raise ValueError(f"max_unread_outputs must be >= 1, got {max_unread_outputs}")
        self.max_unread_outputs = max_unread_outputs
        self.engine = engine
        self.max_queue = max_queue
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self._commands: collections.deque[tuple[str, Any]] = collections.deque()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}  # loop thread only
        self._accepting = True
        self._stop = False
        self._stats: dict[str, int] = dict(engine.stats())
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.num_step_errors = 0
        # Bounded: at most this many requests are being checked (tokenized, rendered, compiled) at once.
        self._prepare_pool = ThreadPoolExecutor(max_workers=PREPARE_WORKERS, thread_name_prefix="tokenmill-prepare")

    # ---- caller side (any thread / event loop) -----------------------------------------------------

    def start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
                self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict[str, int]:
        """Engine stats as of the last step (a snapshot: reading it never touches the engine)."""
        return dict(self._stats)

    @property
    def num_in_flight(self) -> int:
        return self._stats.get("num_in_flight", 0)

    async def add_request(self, request_id: str, prompt: PromptInput, params: SamplingParams) -> RequestStream:
        """Queue a request; raises InvalidRequestError / EngineOverloadedError before any output exists."""
        if not self._accepting:
            raise EngineOverloadedError("the server is shutting down and accepts no new requests")
        self.start()
        loop = asyncio.get_running_loop()
        await self.run_prepare(self.engine.validate_request, prompt, params)
        accepted: asyncio.Future[None] = loop.create_future()
        stream = _Stream(request_id, loop, kind=params.output_kind, n=params.n)
        self._send("add", (stream, prompt, params, accepted))
        try:
            await accepted
        except asyncio.CancelledError:
            self.abort(request_id)  # the caller left before the engine answered
            raise
        return RequestStream(self, stream)

    async def run_prepare(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a request's preparation (tokenizing, template rendering, grammar compiling) on the bounded
        preparation pool, off the event loop and off the step loop."""
        return await asyncio.get_running_loop().run_in_executor(self._prepare_pool, functools.partial(fn, *args))

    async def run_in_engine(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn on the engine's loop thread between two steps: changes to the engine's own state (its LoRA
        adapters) never race a step or a request being added."""
        self.start()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        self._send("call", (functools.partial(fn, *args), loop, done))
        return await done

    async def generate(
        self, request_id: str, prompt: PromptInput, params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs (as params.output_kind says); stopping early (or cancellation) aborts it."""
        stream = await self.add_request(request_id, prompt, params)
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    async def shutdown(self, drain_timeout_s: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish for up to drain_timeout_s, abort the rest, stop."""
        self._accepting = False
        deadline = time.monotonic() + max(drain_timeout_s, 0.0)
        while self.is_running and self._stats.get("num_in_flight", 0) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._send("stop", None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30.0)
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)

    def _send(self, kind: str, payload: Any) -> None:
        self._commands.append((kind, payload))
        self._wakeup.set()

    # ---- loop thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while True:
            self._apply_commands()
            if self._stop:
                break
            if not engine.has_unfinished_requests():
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # a bug or device error no request owns: fail these, keep serving new ones
                self.num_step_errors += 1
                logger.exception("engine step failed; failing %d in-flight request(s)", len(self._streams))
                # The exception text may quote one request's input: only a lone request may read it.
                detail = f": {exc}" if len(self._streams) == 1 else ""
                self._fail_all(RequestFailedError(f"the engine failed while generating: {type(exc).__name__}{detail}"))
                continue
            for request_id, error in engine.take_failures().items():
                failed = self._streams.pop(request_id, None)
                if failed is not None:
                    failed.put(error)
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is None:
                    continue
                stream.record(output)
                stream.put(output)
                if output.finished:
                    del self._streams[output.request_id]
                elif stream.unread > self.max_unread_outputs:
                    self._overflow(stream)
            self._refresh_stats()
        # Stopping: whatever is still in flight ends as aborted.
        for request_id in list(self._streams):
            self._abort_one(request_id, notify=True)
        self._flush_engine()
        engine.persist_kv_cache()  # a disk KV tier keeps the pool's cached blocks for the next start
        engine.close()  # the step thread of asynchronous scheduling
        self._refresh_stats()

    def _apply_commands(self) -> None:
        changed = False
        while self._commands:
            kind, payload = self._commands.popleft()
            changed = True
            if kind == "add":
                self._add(*payload)
            elif kind == "abort":
                self._abort_one(payload, notify=False)
            elif kind == "call":
                _call(*payload)
            elif kind == "stop":
                self._stop = True
        if changed:
            if not self.engine.has_unfinished_requests():
                self._flush_engine()
            self._refresh_stats()

    def _add(self, stream: _Stream, prompt: PromptInput, params: SamplingParams,
             accepted: asyncio.Future[None]) -> None:
        def answer(exc: BaseException | None) -> None:
            if accepted.done():  # the caller was cancelled meanwhile
                return
            if exc is None:
                accepted.set_result(None)
            else:
                accepted.set_exception(exc)

        try:
            if self._stop:
                raise EngineOverloadedError("the server is shutting down and accepts no new requests")
            waiting = self.engine.stats()["num_waiting"]
            if self.max_queue is not None and waiting >= self.max_queue:
                raise EngineOverloadedError(
                    f"too many requests waiting ({waiting}, --max-queue is {self.max_queue}); retry later")
            self.engine.add_request(stream.request_id, prompt, params)
        except Exception as exc:  # bad input: InvalidRequestError names the field
            stream.loop.call_soon_threadsafe(answer, exc)
            return
        self._streams[stream.request_id] = stream
        stream.loop.call_soon_threadsafe(answer, None)

    def _overflow(self, stream: _Stream) -> None:
        """A consumer that stopped reading: abort its request (its KV is freed) and drop its buffer."""
        logger.warning("request %s: %d outputs unread, over the limit of %d; aborting it", stream.request_id,
                       stream.unread, self.max_unread_outputs)
        self._abort_one(stream.request_id, notify=False)
        stream.overflow(RequestFailedError(
            f"the client read none of the last {self.max_unread_outputs} outputs; the request was aborted",
            field="stream"))

    def _abort_one(self, request_id: str, notify: bool) -> None:
        stream = self._streams.pop(request_id, None)
        try:
            self.engine.abort_request(request_id)
        except Exception:
            logger.exception("aborting request %s failed", request_id)
        if stream is not None and notify:
            stream.put(_aborted(stream))

    def _fail_all(self, error: RequestFailedError) -> None:
        for request_id, stream in list(self._streams.items()):
            self._abort_one(request_id, notify=False)
            stream.put(error)
        self._refresh_stats()

    def _flush_engine(self) -> None:
        """Run one empty step so the runner drops per-request state of requests that were aborted."""
        try:
            self.engine.step()
        except Exception:
            logger.exception("engine cleanup step failed")

    def _refresh_stats(self) -> None:
        stats = dict(self.engine.stats())
        stats["num_in_flight"] = len(self._streams)
        self._stats = stats  # one assignment: readers on other threads see the old or the new dict


def _call(fn: Callable[[], Any], loop: asyncio.AbstractEventLoop, done: asyncio.Future[Any]) -> None:
    """A run_in_engine call, its result or error handed back to the caller's loop."""
    try:
        result, error = fn(), None
    except Exception as exc:  # noqa: BLE001 - the caller's error (a bad adapter), raised there
        result, error = None, exc

    def settle() -> None:
        if not done.done():  # the caller was cancelled meanwhile
            done.set_result(result) if error is None else done.set_exception(error)

    loop.call_soon_threadsafe(settle)


def _aborted(stream: _Stream) -> RequestOutput | BaseException:
    """A final output for a request ended by shutdown, finish_reason 'abort' (an error when none can be made)."""
    if stream.last is None:
        # final_only requests send nothing before they finish: no partial result exists to return.
        when = "finished" if stream.kind == "final_only" else "started"
        return EngineOverloadedError(f"the server shut down before this request {when}")
    if stream.kind == "delta":
        # Everything generated already went out: the abort adds only the finish of each running sample.
        outputs = [CompletionOutput(i, "", [], finish_reason="abort")
                   for i in range(stream.n) if i not in stream.finished_samples]
        return RequestOutput(stream.request_id, None, [], outputs, finished=True,
                             num_cached_tokens=stream.last.num_cached_tokens)
    outputs = [o if o.finished else replace(o, finish_reason="abort") for o in stream.last.outputs]
    return replace(stream.last, outputs=outputs, finished=True)
