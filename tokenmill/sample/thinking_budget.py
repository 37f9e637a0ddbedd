"""Hard reasoning budget: once a request has spent its thinking tokens, force the end of thinking.

The tracker watches the request's generated tokens: it enters the thinking section at the start token
(or from the first token when the prompt already opened it), counts the tokens inside, and when the count
reaches the budget replaces the next sampled tokens with `thinking_end_token_ids`, one per step. A model
that closes the section by itself (its last end token) is left alone.
"""

from __future__ import annotations

from collections import deque

from tokenmill.sampling_params import SamplingParams


class ThinkingBudgetTracker:
    def __init__(self, params: SamplingParams) -> None:
        if params.thinking_token_budget is None or not params.thinking_end_token_ids:
            raise ValueError("a thinking budget needs thinking_token_budget and thinking_end_token_ids")
        self.budget = params.thinking_token_budget
        self.start_token_id = params.thinking_start_token_id
        self.end_token_ids = list(params.thinking_end_token_ids)
        self.end_token_id = self.end_token_ids[-1]
        self.in_thinking = params.starts_in_thinking
        self.done = False
        self.num_thinking_tokens = 0
        self._forced: deque[int] = deque()

    def forced_token(self) -> int | None:
        """The token this step must produce, or None to keep the sampled one."""
        if not self._forced and self.in_thinking and not self.done and self.num_thinking_tokens >= self.budget:
            self.done, self.in_thinking = True, False
            self._forced.extend(self.end_token_ids)
        return self._forced.popleft() if self._forced else None

    def observe(self, token_id: int, forced: bool) -> None:
        """Account for the token the request produced this step (forced tokens are not thinking)."""
        if forced or self.done:
            return
        if self.in_thinking:
            if token_id == self.end_token_id:
                self.in_thinking, self.done = False, True
            else:
                self.num_thinking_tokens += 1
        elif token_id == self.start_token_id:
            self.in_thinking = True
