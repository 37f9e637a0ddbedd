"""Offline facade with vLLM's names: LLM(model=PATH, ...).generate(prompts, sampling_params)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

from tokenmill.engine.engine import LLMEngine, PromptInput
from tokenmill.engine.lora_registry import LORA_NAME_KEY
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
        cache_salt: str | None = None,
        lora_name: str | Sequence[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for all prompts together; outputs come back in prompt order, each the whole result.

        Requests run as output_kind "final_only" (whatever the params say): the engine builds each
        output once, when its request finishes. `cache_salt` (or a dict prompt's "cache_salt"): prefix-cache
        hits only come from requests with the same salt. `lora_name` (or a dict prompt's "lora_name"): the
        LoRA adapter (`load_lora`, or enable_lora with lora_modules) each prompt runs through, one for all or
        one per prompt (None: the base model)."""
        prompt_list = [with_cache_salt(p, cache_salt) for p in _as_prompt_list(prompts)]
        prompt_list = [with_prompt_key(p, LORA_NAME_KEY, name)
                       for p, name in zip(prompt_list, _per_prompt(lora_name, len(prompt_list), LORA_NAME_KEY))]
        params_list = _as_params_list(sampling_params, len(prompt_list))
        # Validate everything before queueing anything, so one bad prompt leaves no orphans behind.
        for prompt, params in zip(prompt_list, params_list):
            self.engine.validate_request(prompt, params)
        params_list = [replace(p, output_kind="final_only") for p in params_list]
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
                _raise_own_failure(self.engine, wanted)
        except BaseException:
            self.engine.abort_request([r for r in request_ids if r not in finished])
            raise
        return [finished[r] for r in request_ids]

    def stream(self, prompt: PromptInput, sampling_params: SamplingParams | None = None,
               cache_salt: str | None = None, lora_name: str | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output as deltas, after every step that produced something new.

        Each output carries only what is new since the previous one (output_kind "delta", whatever the
        params say): per changed sample its text delta, new token_ids, new logprobs entries, and its
        finish_reason once it finishes. The prompt fields come in the first output only; the last output
        has finished=True. Concatenating the deltas of a sample (or `tokenmill.outputs.merge_deltas`) gives
        what `generate` returns. Streaming n tokens costs O(n) in all.
        """
        request_id = str(next(self._ids))
        params = replace(sampling_params or SamplingParams(), output_kind="delta")
        prompt = with_prompt_key(with_cache_salt(prompt, cache_salt), LORA_NAME_KEY, lora_name)
        yield from stream_request(self.engine, request_id, prompt, params)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        cache_salt: str | None = None,
        lora_name: str | Sequence[str | None] | None = None,
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
        return self.generate(prompts, sampling_params, cache_salt=cache_salt, lora_name=lora_name)

    def load_lora(self, name: str, path: str) -> None:
        """Register a PEFT adapter folder under `name` (needs enable_lora); requests then pick it by name."""
        self.engine.lora.load(name, path)

    def unload_lora(self, name: str) -> None:
        self.engine.lora.remove(name)

    def _add(self, prompt: PromptInput, params: SamplingParams) -> str:
        request_id = str(next(self._ids))
        self.engine.add_request(request_id, prompt, params)
        return request_id


def stream_request(engine: LLMEngine, request_id: str, prompt: PromptInput,
                   params: SamplingParams) -> Iterator[RequestOutput]:
    """Add one request and step the engine until it finishes, yielding its outputs (as params.output_kind
    says); leaving early aborts it. Outputs of other requests in the engine are dropped."""
    engine.add_request(request_id, prompt, params)
    done = False
    try:
        while not done:
            for output in engine.step():
                if output.request_id == request_id:
                    done = output.finished
                    yield output
            _raise_own_failure(engine, {request_id})
    finally:
        if not done:
            engine.abort_request(request_id)


def _raise_own_failure(engine: LLMEngine, wanted: set[str]) -> None:
    """A request of ours that failed alone (its grammar, its output) raises its own error here."""
    for request_id, error in engine.take_failures().items():
        if request_id in wanted:
            raise error


def with_cache_salt(prompt: PromptInput, cache_salt: str | None) -> PromptInput:
    """The prompt as a dict carrying cache_salt (the engine checks the value); unchanged without one."""
    return with_prompt_key(prompt, "cache_salt", cache_salt)


def with_prompt_key(prompt: PromptInput, key: str, value: str | None) -> PromptInput:
    """The prompt as a dict carrying `key` (cache_salt, lora_name; the engine checks the value); unchanged
    when value is None."""
    if value is None:
        return prompt
    if isinstance(prompt, dict):
        if prompt.get(key, value) != value:
            raise InvalidRequestError(key, "given both as an argument and, different, in a prompt dict")
        return {**prompt, key: value}
    if isinstance(prompt, str):
        return {"prompt": prompt, key: value}
    return {"prompt_token_ids": prompt, key: value}


def _per_prompt(value: str | Sequence[str | None] | None, count: int, name: str) -> list[str | None]:
    if value is None or isinstance(value, str):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise InvalidRequestError(name, f"got {len(values)} for {count} prompts; give one or one each")
    return values


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
