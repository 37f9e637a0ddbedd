"""A model-free stand-in for LLMEngine: deterministic tokens, real block accounting, optional failures.

Token k of every request is k, its text " k"; outputs follow the request's output_kind.

It lets the AsyncLLMEngine's threading, cancellation, queue limit and error paths be tested exactly and
fast, without depending on model code.
"""

from __future__ import annotations

import threading

from tokenmill.errors import InvalidRequestError
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import SamplingParams


class FakeEngine:
    def __init__(self, step_delay_s: float = 0.0, fail_on_step: int | None = None) -> None:
        self.tokenizer = None
        self.max_model_len = 64
        self.step_delay_s = step_delay_s
        self.fail_on_step = fail_on_step
        self.requests: dict[str, tuple[list[int], SamplingParams, list[int]]] = {}
        self.waiting: list[str] = []
        self.num_steps = 0
        self.aborted: list[str] = []
        self._owner: int | None = None  # the one thread allowed to call us
        self._gate = threading.Event()
        self._gate.set()

    def _check_thread(self) -> None:
        me = threading.get_ident()
        if self._owner is None:
            self._owner = me
        assert self._owner == me, "the engine was touched from two threads"

    def validate_request(self, prompt: list[int], params: SamplingParams) -> None:
        """Stateless, like LLMEngine.validate_request: called from the async engine's preparation pool."""
        if not prompt:
            raise InvalidRequestError("prompt", "must contain at least one token")

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        self._check_thread()
        if not prompt:
            raise InvalidRequestError("prompt", "must contain at least one token")
        self.requests[request_id] = (list(prompt), params, [])
        self.waiting.append(request_id)

    def abort_request(self, request_ids: str | list[str]) -> None:
        self._check_thread()
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            if self.requests.pop(request_id, None) is not None:
                self.aborted.append(request_id)
            if request_id in self.waiting:
                self.waiting.remove(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def take_failures(self) -> dict[str, Exception]:
        return {}  # this stand-in fails whole steps (fail_on_step), never one request alone

    def step(self) -> list[RequestOutput]:
        self._check_thread()
        self._gate.wait()
        if not self.requests:
            return []
        self.num_steps += 1
        if self.fail_on_step is not None and self.num_steps == self.fail_on_step:
            raise RuntimeError("simulated device failure")
        if self.step_delay_s:
            threading.Event().wait(self.step_delay_s)
        self.waiting.clear()
        outputs = []
        for request_id, (prompt, params, generated) in list(self.requests.items()):
            generated.append(len(generated) + 1)
            finished = len(generated) >= (params.max_tokens or 1)
            reason = "length" if finished else None
            if params.output_kind == "delta":  # token k's text is " k" (no space before the first)
                text = f"{' ' if len(generated) > 1 else ''}{generated[-1]}"
                first = len(generated) == 1
                completion = CompletionOutput(0, text, [generated[-1]], finish_reason=reason)
                outputs.append(RequestOutput(request_id, None, prompt if first else [], [completion], finished))
            elif params.output_kind == "cumulative" or finished:
                completion = CompletionOutput(0, " ".join(map(str, generated)), list(generated), finish_reason=reason)
                outputs.append(RequestOutput(request_id, None, prompt, [completion], finished=finished))
            if finished:
                del self.requests[request_id]
        return outputs

    def persist_kv_cache(self) -> int:
        self._check_thread()
        return 0

    def stats(self) -> dict[str, int]:
        running = len(self.requests) - len(self.waiting)
        return {"num_running": running, "num_waiting": len(self.waiting), "kv_blocks_total": 100,
                "kv_blocks_used": len(self.requests), "num_preemptions": 0, "prefix_cache_queried_tokens": 0,
                "prefix_cache_hit_tokens": 0, "num_steps": self.num_steps}
