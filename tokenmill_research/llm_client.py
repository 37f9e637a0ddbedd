"""The research assistant's only door to a language model: an OpenAI-compatible HTTP endpoint.

Three kinds of call: a chat reply (text), a chat reply constrained by a JSON schema (response_format
json_schema; tokenmill enforces it with a grammar, so even a 135M model's output parses), and one batched
completions call that reads each prompt's next-token logprobs of "yes" and "no" (the relevance judge).
Connection failures become one ResearchError naming the endpoint, never a traceback.
"""

from __future__ import annotations

import json
import math
from typing import Any

from tokenmill_research.errors import EndpointError, ReplyFormatError, ResearchError

JUDGE_TOP_LOGPROBS = 10
REQUEST_TIMEOUT_S = 300.0


class LLMClient:
    def __init__(self, base_url: str, model: str, api_key: str = "none", timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        try:
            import openai
        except ModuleNotFoundError:
            raise ResearchError("the openai client is not installed; pip install 'tokenmill[research]'") from None
        self._openai = openai
        self.base_url = base_url
        self.model = model
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=1, timeout=timeout_s)

    def _call(self, fn, **kwargs: Any) -> Any:
        try:
            return fn(model=self.model, **kwargs)
        except self._openai.APIConnectionError as exc:
            raise EndpointError(f"cannot reach the model endpoint {self.base_url} ({exc}); is the server up?") from None
        except self._openai.APIStatusError as exc:
            raise EndpointError(f"the model endpoint {self.base_url} answered HTTP {exc.status_code}: "
                                f"{str(exc.message)[:300]}") from None

    def chat(self, messages: list[dict[str, str]], max_tokens: int, **extra: Any) -> str:
        response = self._call(self.client.chat.completions.create, messages=messages, max_tokens=max_tokens,
                              temperature=0.0, **extra)
        return response.choices[0].message.content or ""

    def chat_json(self, messages: list[dict[str, str]], schema: dict, max_tokens: int) -> Any:
        """A reply constrained to the schema, parsed; ResearchError when the endpoint ignored the schema and
        the reply is not JSON (callers fall back to a plan without the model)."""
        text = self.chat(messages, max_tokens,
                         response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}})
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise ReplyFormatError(f"the model's reply is not the JSON asked for: {text[:200]!r}") from None

    def yes_probabilities(self, prompts: list[str]) -> list[float | None]:
        """P(yes) / (P(yes) + P(no)) for the next token of each prompt, from one batched completions call;
        None where neither answer is among the top logprobs."""
        if not prompts:
            return []
        response = self._call(self.client.completions.create, prompt=prompts, max_tokens=1, temperature=0.0,
                              logprobs=JUDGE_TOP_LOGPROBS)
        by_index = {choice.index: choice for choice in response.choices}
        return [_yes_share(by_index[i].logprobs) if i in by_index else None for i in range(len(prompts))]


def _yes_share(logprobs: Any) -> float | None:
    tops = (logprobs.top_logprobs or [None])[0] if logprobs is not None else None
    if not tops:
        return None
    yes = sum(math.exp(lp) for token, lp in tops.items() if token.strip().lower() == "yes")
    no = sum(math.exp(lp) for token, lp in tops.items() if token.strip().lower() == "no")
    return yes / (yes + no) if yes + no > 0 else None
