"""Token-budget scheduler: running requests first, then waiting ones; chunked prefill; preemption.

Each step hands out at most `max_num_batched_tokens` tokens. A running request asks for all its uncomputed
tokens (1 when decoding); a long prompt takes what the budget leaves and continues next step, in the same
batch as other requests' decodes. When the pool runs short the most recently admitted running request is
preempted: its blocks are freed and it is recomputed later (its cached full blocks usually survive).

With `async_scheduling` the engine plans step n+1 before step n's sampled tokens are known: scheduling
counts a chunk's tokens as computed at once and each sampling chunk adds a placeholder output token; a
decode chunk whose token is such a placeholder is marked so the worker fills it in. `update` then replaces
placeholders with the real tokens and checks stops one step late: a request that stopped at step n has
computed one more token in step n+1, which is discarded, and its blocks are freed when step n's results
arrive. A request whose in-flight tokens already reach max_tokens or the context is not scheduled again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from tokenmill.core.kv_manager import KVCacheManager
from tokenmill.core.lora_slots import LoRASlots
from tokenmill.core.request import Request, RequestStatus, draft_room
from tokenmill.core.sched_io import (PLACEHOLDER_TOKEN_ID, ModelRunnerOutput, NewRequestData, ScheduledChunk,
                                     SchedulerOutput)
from tokenmill.core.spec_stats import SpecDecodeStats
from tokenmill.core.stop_checker import check_stop


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    # KV slots reserved past a decoding request's tokens, for a draft model writing its drafts' KV.
    num_lookahead_tokens: int = 0
    # LoRA slots in the worker (0: LoRA off); running requests use at most this many distinct adapters.
    max_loras: int = 0


@dataclass
class StepUpdate:
    """What one step did to one request, for output processing."""

    request: Request
    new_token_ids: list[int]


class Scheduler:
    def __init__(self, limits: SchedulerLimits, kv_manager: KVCacheManager, async_scheduling: bool = False) -> None:
        self.limits = limits
        self.kv = kv_manager
        self.async_scheduling = async_scheduling
        # Asynchronous scheduling: the requests of each step planned but not yet updated, oldest first, in
        # chunk order (the objects, so a request id reused after a finish cannot take another's results).
        self._plans: deque[list[Request]] = deque()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.loading: dict[str, Request] = {}  # LOADING_KV: prefix on its way from a KV tier (core/tier_io.py)
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._announced: set[str] = set()
        self._finished_since_last_step: list[str] = []
        self._resumed: list[str] = []
        self.spec_stats = SpecDecodeStats()
        self.lora_slots = LoRASlots(limits.max_loras) if limits.max_loras else None

    # ---- queue management -------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish (abort or stop) requests wherever they are; their blocks are freed at once."""
        finished = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            elif request.status == RequestStatus.LOADING_KV:
                del self.loading[request_id]
                assert self.kv.tiers is not None
                self.kv.tiers.cancel_load(request_id)  # before its blocks are freed for others
            else:
                self.waiting.remove(request)
            self._finish(request, status)
            finished.append(request)
        return finished

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.kv.forget(request)
        del self.requests[request.request_id]
        if request.request_id in self._announced:
            self._announced.discard(request.request_id)
            self._finished_since_last_step.append(request.request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---- scheduling ---------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.limits.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        new_requests: list[NewRequestData] = []
        preempted = False
        if self.loading:
            self._finish_loads()

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if self.async_scheduling and not self._plannable(request):
                index += 1
                continue
            num_known = request.num_tokens + request.num_output_placeholders - request.num_computed_tokens
            # Drafts ride along with a decode, inside the budget; a short budget trims them.
            num_new = min(num_known + len(request.spec_token_ids), budget)
            lookahead = self.limits.num_lookahead_tokens if num_new >= num_known else 0
            while not self.kv.allocate_slots(request, num_new, num_lookahead_tokens=lookahead):
                victim = self.running.pop()  # the most recently admitted
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            else:
                chunks.append(self._chunk(request, num_new, num_spec=max(num_new - num_known, 0)))
                budget -= num_new
                index += 1
                continue
            break  # the request itself was preempted; nothing after it remains in `running`

        # Admitting new work right after a preemption would only thrash the pool.
        if not preempted:
            budget = self._admit_waiting(budget, chunks)

        if self.async_scheduling and chunks:
            self._plans.append(self._advance(chunks))
        for chunk in chunks:
            if chunk.req_id not in self._announced:
                self._announced.add(chunk.req_id)
                request = self.requests[chunk.req_id]
                new_requests.append(
                    NewRequestData(request.request_id, list(request.prompt_token_ids), request.sampling_params)
                )
        finished, self._finished_since_last_step = self._finished_since_last_step, []
        resumed, self._resumed = self._resumed, []
        lora_loads = self.lora_slots.place(chunks, self.requests) if self.lora_slots is not None else {}
        return SchedulerOutput(
            chunks=chunks, new_requests=new_requests, finished_req_ids=finished, resumed_req_ids=resumed,
            num_waiting=len(self.waiting), lora_loads=lora_loads,
        )

    def _admit_waiting(self, budget: int, chunks: list[ScheduledChunk]) -> int:
        held_back: list[Request] = []
        adapters = {r.lora_id for r in self.running if r.lora_id is not None}  # LoRA slots the running use
        while self.waiting and budget > 0 and len(self.running) < self.limits.max_num_seqs:
            request = self.waiting[0]
            # A request preempted while a step of it ran waits for that step's token before it resumes; one
            # whose adapter would need a LoRA slot more than there are waits for a running adapter to finish.
            if request.num_output_placeholders or (
                    request.wait_for is not None and not self._sibling_prompt_done(request.wait_for)) or (
                    self.lora_slots is not None and not self.lora_slots.fits(request.lora_id, adapters)):
                held_back.append(self.waiting.popleft())
                continue
            if request.prefix_loaded:  # a tier load wrote its prefix into blocks it already holds
                computed_blocks, num_hit = [], request.num_computed_tokens
            else:
                computed_blocks, num_hit = self.kv.get_computed_blocks(request)
                if self._start_tier_load(request, computed_blocks):
                    continue
            num_new = min(request.num_tokens - num_hit, budget)
            completes = num_new == request.num_tokens - num_hit  # it samples, and may draft, this step
            lookahead = self.limits.num_lookahead_tokens if completes else 0
            if not self.kv.allocate_slots(request, num_new, computed_blocks, num_lookahead_tokens=lookahead):
                if request.prefix_loaded:  # holding blocks while waiting could starve the pool: give them back
                    self._drop_loaded_prefix(request)
                break
            self.waiting.popleft()
            request.prefix_loaded = False
            if request.status == RequestStatus.PREEMPTED:
                self._resumed.append(request.request_id)
            request.num_computed_tokens = num_hit
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if request.lora_id is not None:
                adapters.add(request.lora_id)
            chunks.append(self._chunk(request, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(held_back))
        return budget

    def _start_tier_load(self, request: Request, computed_blocks: list) -> bool:
        """Blocks past the device hits that a KV tier holds: allocate device blocks for them, start the load and
        park the request in LOADING_KV (it leaves `waiting`). False when there is nothing to load or no room."""
        tier_hashes = [] if request.tier_load_failed else self.kv.get_tier_hits(request, len(computed_blocks))
        if not tier_hashes:
            return False
        num_load_tokens = len(tier_hashes) * self.kv.block_size
        if not self.kv.allocate_slots(request, num_load_tokens, computed_blocks):
            return False
        self.waiting.popleft()
        request.status_before_load = request.status
        request.status = RequestStatus.LOADING_KV
        request.num_loading_blocks = len(tier_hashes)
        self.loading[request.request_id] = request
        assert self.kv.tiers is not None
        load_block_ids = self.kv.block_ids(request.request_id)[len(computed_blocks):]
        self.kv.tiers.start_load(request.request_id, tier_hashes, load_block_ids)
        return True

    def _finish_loads(self) -> None:
        """Loaded requests go back to the front of `waiting` holding their prefix, to be admitted as a hit."""
        assert self.kv.tiers is not None
        done = [(rid, n) for rid, n in self.kv.tiers.finished_loads().items() if rid in self.loading]
        for request_id, num_loaded in reversed(done):
            request = self.loading.pop(request_id)
            self.kv.keep_loaded_prefix(request, self.kv.num_cached_blocks(request) + num_loaded)
            request.status = request.status_before_load
            request.tier_load_failed = num_loaded < request.num_loading_blocks
            request.prefix_loaded = request.num_computed_tokens > 0
            if not request.prefix_loaded:
                self.kv.free(request)
            self.waiting.appendleft(request)

    def _drop_loaded_prefix(self, request: Request) -> None:
        """Release a loaded prefix's blocks; they stay cached, so a later admission usually hits them anyway."""
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.prefix_loaded = False

    def _sibling_prompt_done(self, sibling_id: str) -> bool:
        sibling = self.requests.get(sibling_id)
        # Its prompt's blocks enter the prefix cache when that step's results arrive (asynchronous scheduling
        # counts them computed earlier): until then a sibling would miss them.
        return sibling is None or (sibling.num_computed_tokens >= sibling.num_prompt_tokens
                                   and (sibling.num_output_tokens > 0 or not sibling.num_output_placeholders))

    def _chunk(self, request: Request, num_new: int, num_spec: int = 0) -> ScheduledChunk:
        start = request.num_computed_tokens
        num_known = num_new - num_spec
        token_ids = request.all_token_ids[start : start + num_known]
        # Past the known tokens: the one placeholder whose id the worker holds (_plannable allows no more).
        num_unknown = num_known - len(token_ids)
        return ScheduledChunk(
            req_id=request.request_id,
            token_ids=token_ids + [PLACEHOLDER_TOKEN_ID] * num_unknown + request.spec_token_ids[:num_spec],
            start_pos=start,
            block_table=self.kv.block_ids(request.request_id),
            sample=start + num_known == request.num_tokens + request.num_output_placeholders,
            num_spec_tokens=num_spec,
            placeholder=num_unknown > 0,
            want_prompt_logprobs=request.sampling_params.prompt_logprobs is not None
            and start < request.num_prompt_tokens,
        )

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.spec_token_ids = []
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    # ---- asynchronous scheduling ----------------------------------------------------------------

    def _plannable(self, request: Request) -> bool:
        """Whether a running request may be scheduled while earlier steps of it are still unresolved: it has
        something to compute, at most one unknown token (the worker holds the last sampled one only), and its
        in-flight tokens do not already reach max_tokens or the context (it finishes when they arrive)."""
        num_extended = request.num_tokens + request.num_output_placeholders
        num_unknown = num_extended - max(request.num_tokens, request.num_computed_tokens)
        if num_extended <= request.num_computed_tokens or num_unknown > 1:
            return False
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None and request.num_output_tokens + request.num_output_placeholders >= max_tokens:
            return False
        return num_extended < self.limits.max_model_len

    def _advance(self, chunks: list[ScheduledChunk]) -> list[Request]:
        """Count the planned chunks as computed and their samples as placeholders; the plan's requests."""
        planned = []
        for chunk in chunks:
            request = self.requests[chunk.req_id]
            request.num_computed_tokens += len(chunk.token_ids)
            request.num_output_placeholders += chunk.sample
            planned.append(request)
        return planned

    def oldest_plan(self) -> list[Request]:
        """The requests of the oldest step not yet updated, in chunk order (asynchronous scheduling)."""
        return self._plans[0]

    def discard_plans(self, steps: list[SchedulerOutput]) -> None:
        """Steps that will never report (their execution raised), oldest first: undo what planning counted."""
        for step, planned in reversed(list(zip(steps, self._plans))):
            for chunk, request in zip(step.chunks, planned):
                request.num_output_placeholders -= chunk.sample
                if request.status == RequestStatus.RUNNING:
                    request.num_computed_tokens -= len(chunk.token_ids)
        self._plans.clear()

    def _update_planned(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput) -> list[StepUpdate]:
        """Asynchronous update: the placeholders become the sampled tokens; stops are checked now."""
        updates: list[StepUpdate] = []
        planned = self._plans.popleft()
        for chunk, request, sampled in zip(scheduler_output.chunks, planned, runner_output.sampled_token_ids):
            request.num_output_placeholders -= chunk.sample
            if request.is_finished:
                continue  # stopped or aborted while this step ran: what it computed is discarded
            new_tokens, status = self._append_until_stop(request, sampled)
            if request.status == RequestStatus.RUNNING:  # a preempted request keeps no blocks to cache
                # Only what this step (and the steps before it) wrote: later planned steps are in flight.
                self.kv.cache_full_blocks(request, min(chunk.start_pos + len(chunk.token_ids), request.num_tokens))
            if status is not None:
                (self.running if request.status == RequestStatus.RUNNING else self.waiting).remove(request)
                self._finish(request, status)
            updates.append(StepUpdate(request, new_tokens))
        return updates

    def _append_until_stop(self, request: Request, sampled: list[int]) -> tuple[list[int], RequestStatus | None]:
        """Append the step's sampled tokens up to the first that stops the request; (appended, stop status)."""
        new_tokens: list[int] = []
        for token_id in sampled:
            request.append_output_token(token_id)
            new_tokens.append(token_id)
            status = check_stop(request, self.limits.max_model_len)
            if status is not None:
                return new_tokens, status
        return new_tokens, None

    # ---- results ------------------------------------------------------------------------------

    def update(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput) -> list[StepUpdate]:
        """Advance computed counts, append sampled tokens, cache full blocks, finish stopped requests."""
        if self.async_scheduling:
            return self._update_planned(scheduler_output, runner_output)
        updates: list[StepUpdate] = []
        for chunk, sampled in zip(scheduler_output.chunks, runner_output.sampled_token_ids):
            request = self.requests.get(chunk.req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # finished or preempted while the step ran
            # Rejected drafts roll back: only the accepted ones count as computed, so their KV slots
            # are overwritten later and never enter the prefix cache.
            num_spec = chunk.num_spec_tokens
            num_accepted = min(max(len(sampled) - 1, 0), num_spec)
            request.num_computed_tokens += len(chunk.token_ids) - num_spec + num_accepted
            request.spec_token_ids = []
            if num_spec:
                request.spec_stats.record(num_spec, num_accepted)
                self.spec_stats.record(num_spec, num_accepted)
            new_tokens, status = self._append_until_stop(request, sampled)
            # A stop inside the accepted drafts drops the drafts after it.
            request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens)
            # After appending: accepted drafts are computed tokens that only now have ids to hash.
            self.kv.cache_full_blocks(request)
            if status is not None:
                self.running.remove(request)
                self._finish(request, status)
            else:
                request.spec_token_ids = self._trim_drafts(request, runner_output.spec_token_ids.get(request.request_id))
            updates.append(StepUpdate(request, new_tokens))
        return updates

    def spec_stats_dict(self) -> dict[str, float | int | list[float]]:
        return {f"spec_{k}": v for k, v in self.spec_stats.as_dict().items()}

    def _trim_drafts(self, request: Request, drafts: list[int] | None) -> list[int]:
        """Drafts beyond what the request may still emit are wasted work."""
        if not drafts:
            return []
        room = draft_room(request.num_tokens, request.num_output_tokens, request.sampling_params.max_tokens,
                          self.limits.max_model_len)
        return list(drafts[:room])
