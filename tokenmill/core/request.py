"""Request state as the scheduler sees it: tokens, how many are computed, status."""

from __future__ import annotations

import enum

from tokenmill.core.spec_stats import SpecDecodeStats
from tokenmill.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    LOADING_KV = "loading_kv"  # its prefix is being loaded from a KV tier (host / disk) into the pool
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


class Request:
    """One sequence being generated.

    `num_computed_tokens` counts tokens whose KV is in the cache. Every step schedules
    `num_tokens - num_computed_tokens` more (capped by the budget); when the scheduled tokens reach the
    end of the known tokens the worker samples one more. That single rule covers prefill, chunked prefill,
    prefix hits, decode and recompute after preemption.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        arrival_index: int = 0,
        wait_for: str | None = None,
        cache_salt: str | None = None,
        lora_id: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.arrival_index = arrival_index
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit at first admission; -1 until admitted
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        # Sibling of a parallel-sampling group whose prompt must be computed first, so this one can
        # reuse its blocks through the prefix cache instead of recomputing them.
        self.wait_for = wait_for
        # Prefix-cache isolation: hits only come from requests with the same salt (core/prefix_cache.py).
        self.cache_salt = cache_salt
        # The LoRA adapter's identity (a hash of its files; None: the base model): its KV is its own.
        self.lora_id = lora_id
        # Draft tokens proposed for the next step; the target verifies them as ordinary tokens of it.
        self.spec_token_ids: list[int] = []
        self.spec_stats = SpecDecodeStats()
        # Set when a KV-tier load wrote its prefix into blocks it holds: admission then skips the lookup.
        self.prefix_loaded = False
        self.status_before_load = RequestStatus.WAITING
        self.num_loading_blocks = 0
        # A tier load that came back short is not retried for this request: it recomputes instead of looping.
        self.tier_load_failed = False
        # Tokens that scheduled steps will sample but whose ids are not known yet (asynchronous scheduling:
        # the next step is planned before this one's results arrive). Always 0 when steps run one at a time.
        self.num_output_placeholders = 0

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def is_decoding(self) -> bool:
        """All known tokens but the last are computed: the next step decodes (and may verify drafts)."""
        return self.num_tokens - self.num_computed_tokens == 1

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )


def draft_room(num_tokens: int, num_output_tokens: int, max_tokens: int | None, max_model_len: int) -> int:
    """How many draft tokens a request may still use: the target always adds one token after its drafts,
    and the request may neither outgrow the context nor generate past max_tokens."""
    room = max_model_len - num_tokens - 1
    if max_tokens is not None:
        room = min(room, max_tokens - num_output_tokens - 1)
    return max(room, 0)
