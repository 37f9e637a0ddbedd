"""Offline facade with vLLM's names: LLM(model=PATH, ...).generate(prompts, sampling_params)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from tokenmill.engine.engine import LLMEngine, PromptInput
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.engine_args import EngineArgs
from tokenmill.errors import InvalidRequestError
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

Message = dict[str, Any]


class LLM:
    def __init__(self, model: str | None, show_progress: bool = False, **engine_kwargs: Any) -> None:
        """`model`: checkpoint folder (None: tokenmill's default model); `engine_kwargs`: any other EngineArgs
        field (dtype, max_model_len, speculative_method, compile, ...). An unknown name raises ConfigError."""
        engine_args = EngineArgs.from_kwargs(model=model, **engine_kwargs)
        self.engine = LLMEngine(engine_args.create_engine_config(), show_progress=show_progress)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for all prompts together; outputs come back in prompt order."""
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        # Validate everything before queueing anything, so one bad prompt leaves no orphans behind.
        for prompt, params in zip(prompt_list, params_list):
            self.engine.validate_request(prompt, params)
        request_ids: list[str] = []
        finished: dict[str, RequestOutput] = {}
        try:
            for prompt, params in zip(prompt_list, params_list):
                request_ids.append(self._add(prompt, params))
            wanted = set(request_ids)
            while len(finished) < len(request_ids):
                for output in self.engine.step():
                    if output.finished and output.request_id in wanted:
                        finished[output.request_id] = output
        except BaseException:
            self.engine.abort_request([r for r in request_ids if r not in finished])
            raise
        return [finished[r] for r in request_ids]

    def stream(self, prompt: PromptInput, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's cumulative output after every step that changed it, the last one finished."""
        request_id = self._add(prompt, sampling_params or SamplingParams())
        done = False
        try:
            while not done:
                for output in self.engine.step():
                    if output.request_id == request_id:
                        done = output.finished
                        yield output
        finally:
            if not done:
                self.engine.abort_request(request_id)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Render each conversation with the checkpoint's chat template, then generate."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise InvalidRequestError("messages", "this checkpoint has no tokenizer, so it cannot chat")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        kwargs = chat_template_kwargs or {}
        prompts: list[PromptInput] = [
            tokenizer.render_chat(c, add_generation_prompt=add_generation_prompt, **kwargs).prompt()
            for c in conversations
        ]
        return self.generate(prompts, sampling_params)

    def _add(self, prompt: PromptInput, params: SamplingParams) -> str:
        request_id = str(next(self._ids))
        self.engine.add_request(request_id, prompt, params)
        return request_id


def _as_prompt_list(prompts: PromptInput | Sequence[PromptInput]) -> list[PromptInput]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]  # a single prompt given as token ids
    return list(prompts)


def _as_params_list(params: SamplingParams | Sequence[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(count)]
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise InvalidRequestError("sampling_params", f"got {len(params)} for {count} prompts; give one or one each")
    return params
