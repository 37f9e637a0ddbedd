"""LLMEngine: add_request, abort, step() = schedule -> execute -> update -> outputs."""

from __future__ import annotations

import functools
import itertools
import json
import logging
import threading
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.core.kv_manager import KVCacheManager
from tokenmill.core.request import Request, RequestStatus
from tokenmill.core.sched_io import ModelRunnerOutput, SchedulerOutput
from tokenmill.core.scheduler import Scheduler, SchedulerLimits
from tokenmill.engine.async_loop import PlannedSteps, plan_ahead_blocker, run_blocker
from tokenmill.engine.lora_registry import LoRARegistry
from tokenmill.engine.output_builder import RequestGroup
from tokenmill.engine.prompt_checks import check_prompt_length
from tokenmill.engine.thinking import ThinkingTokens, thinking_tokens, with_thinking_ids
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.errors import ConfigError, InvalidRequestError, RequestFailedError, TokenmillError
from tokenmill.input_checks import check_cache_salt, check_text
from tokenmill.kv_tiers.events import KVEvent
from tokenmill.kv_tiers.setup import build_kv_tiers
from tokenmill.models.gguf import is_gguf_path
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.platform import default_async_scheduling
from tokenmill.spec_decode.factory import build_speculator
from tokenmill.worker.worker import Worker

logger = logging.getLogger(__name__)

PromptInput = str | list[int] | dict[str, Any]


def prompt_cache_salt(prompt: PromptInput) -> str | None:
    """A dict prompt's optional "cache_salt" (vLLM's name): prefix-cache hits only come from the same salt."""
    return check_cache_salt(prompt.get("cache_salt")) if isinstance(prompt, dict) else None


class LLMEngine:
    def __init__(self, config: EngineConfig, show_progress: bool = False) -> None:
        self.config = config
        drafter_factory = None
        if config.spec.method is not None:
            drafter_factory = partial(build_speculator, config)
        self.worker = Worker(config, drafter_factory, show_progress=show_progress)
        self.device, self.arch, self.dtype = self.worker.device, self.worker.arch, self.worker.dtype
        self.model = self.worker.model  # for tools that measure it (bench); the engine itself only steps the worker
        self.max_model_len = self.worker.max_model_len
        self.tokenizer = _load_tokenizer(config.model, required=config.load_format != "random")
        self.eos_token_ids = _eos_token_ids(config.model, self.arch.eos_token_ids, self.tokenizer)
        num_blocks = self.worker.profile()
        self.worker.init_cache(num_blocks)
        block_size = config.cache.block_size
        self.kv_tiers = build_kv_tiers(config, self.model.attention_layers(), num_blocks, self.dtype,
                                       self.worker.kv_dtype)
        self.kv_manager = KVCacheManager(num_blocks, block_size, config.cache.enable_prefix_caching, self.kv_tiers)
        limits = SchedulerLimits(
            max_num_seqs=config.scheduler.max_num_seqs,
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            num_lookahead_tokens=self.worker.num_lookahead_tokens,
            max_loras=config.lora.max_loras if config.lora is not None else 0,
        )
        self.async_scheduling = self._resolve_async_scheduling()
        self.scheduler = Scheduler(limits, self.kv_manager, async_scheduling=self.async_scheduling)
        # With asynchronous scheduling the worker's steps run on their own thread, one planned ahead.
        self._planned = PlannedSteps(self.scheduler, self.worker.execute) if self.async_scheduling else None
        self._grammar_compiler: Any = None
        self._compiler_lock = threading.Lock()
        self._groups: dict[str, RequestGroup] = {}
        self._child_to_group: dict[str, str] = {}
        self._arrivals = itertools.count()
        self._last_step_seconds: float | None = None
        self.num_steps = 0
        self.failures: dict[str, RequestFailedError] = {}  # request id -> its own error, until taken
        self.lora = LoRARegistry(self.worker.lora, lambda identity: any(
            r.lora_id == identity for r in self.scheduler.requests.values()))
        for name, path in config.lora.modules if config.lora is not None else ():
            try:
                self.lora.load(name, path)
            except InvalidRequestError as exc:
                raise ConfigError("lora_modules", f"{name}={path}: {exc.message}") from None

    def _resolve_async_scheduling(self) -> bool:
        wanted = self.config.async_scheduling
        if wanted is None:
            wanted = default_async_scheduling(self.device)
        blocker = run_blocker(self.config.spec.method is not None)
        if wanted and blocker is not None:
            logger.info("asynchronous scheduling is off for this engine: %s", blocker)
            return False
        return wanted

    def close(self) -> None:
        """Stop the step thread (asynchronous scheduling); the engine takes no more steps."""
        if self._planned is not None:
            self._planned.close()

    # ---- requests ---------------------------------------------------------------------------

    def tokenize_prompt(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        """(prompt text or None, prompt token ids), validated against the vocabulary and context."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                text, token_ids = prompt.get("prompt"), prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                return self.tokenize_prompt(prompt["prompt"])
            else:
                raise InvalidRequestError("prompt", "a dict prompt needs 'prompt' or 'prompt_token_ids'")
        elif isinstance(prompt, str):
            check_text(prompt, "prompt")
            if self.tokenizer is None:
                raise InvalidRequestError("prompt", "this checkpoint has no tokenizer; pass prompt_token_ids")
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, prompt
        if not isinstance(token_ids, (list, tuple)) or not token_ids:
            raise InvalidRequestError("prompt", "must contain at least one token")
        vocab = self.arch.vocab_size
        for token in token_ids:
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab:
                raise InvalidRequestError("prompt_token_ids", f"token ids must be integers in [0, {vocab}), got {token!r}")
        check_prompt_length(len(token_ids), self.max_model_len)
        return text, list(token_ids)

    @functools.cached_property
    def thinking_tokens(self) -> ThinkingTokens | None:
        """config.thinking's tags as this tokenizer's ids (None without a tokenizer), derived once."""
        return None if self.tokenizer is None else thinking_tokens(self.tokenizer, self.config.thinking)

    def _with_thinking_ids(self, params: SamplingParams, text: str | None, token_ids: list[int]) -> SamplingParams:
        return with_thinking_ids(params, self.thinking_tokens, self.config.thinking, self.tokenizer, text, token_ids)

    def validate_request(self, prompt: PromptInput, params: SamplingParams) -> None:
        """Everything add_request checks, without queueing: lets a batch be checked before any of it runs.

        Changes no engine state (the grammar cache aside), so any thread may call it while the engine steps."""
        params.validate(self.arch.vocab_size)
        prompt_cache_salt(prompt)
        self.lora.identity_for(prompt)
        text, token_ids = self.tokenize_prompt(prompt)
        self._with_thinking_ids(params, text, token_ids)
        if params.structured_outputs is not None:
            self._structured_compiler().compile(params.structured_outputs)

    def add_request(self, request_id: str, prompt: PromptInput, params: SamplingParams | None = None) -> None:
        """Validate and queue a request; bad input raises InvalidRequestError and changes nothing."""
        params = params or SamplingParams()
        params.validate(self.arch.vocab_size)
        if request_id in self._groups:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        cache_salt = prompt_cache_salt(prompt)
        lora_id = self.lora.identity_for(prompt)
        text, token_ids = self.tokenize_prompt(prompt)
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop", "stop strings need a tokenizer; this checkpoint has none")
        params = replace(self._with_thinking_ids(params, text, token_ids), eos_token_ids=self.eos_token_ids)
        if params.structured_outputs is not None:
            # Compile now (cached per schema) so a bad schema is the caller's error, not the step loop's.
            self._structured_compiler().compile(params.structured_outputs)
        group = RequestGroup(request_id, text, token_ids, params, self.tokenizer)
        first_child: str | None = None
        for index in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{index}"
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = replace(params, seed=params.seed + index)
            child = Request(child_id, token_ids, child_params, next(self._arrivals), wait_for=first_child,
                            cache_salt=cache_salt, lora_id=lora_id)
            first_child = first_child or child_id
            group.add_child(index, child)
            self._child_to_group[child_id] = request_id
            self.scheduler.add_request(child)
        self._groups[request_id] = group

    def _structured_compiler(self) -> Any:
        """The grammar compiler, created (and handed to the worker) by the first structured request."""
        with self._compiler_lock:  # validate_request may run on several preparation threads at once
            return self._make_structured_compiler()

    def _make_structured_compiler(self) -> Any:
        if self._grammar_compiler is None:
            if self.tokenizer is None:
                raise InvalidRequestError("structured_outputs", "needs a tokenizer; this checkpoint has none")
            from tokenmill.structured.backend import GrammarCompiler

            compiler = GrammarCompiler(self.tokenizer, vocab_size=self.arch.vocab_size, eos_token_ids=self.eos_token_ids)
            self.worker.enable_structured_output(compiler)
            self._grammar_compiler = compiler
        return self._grammar_compiler

    def abort_request(self, request_ids: str | list[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for request_id in ids:
            group = self._groups.pop(request_id, None)
            if group is None:
                continue
            children = group.child_ids()
            self.scheduler.finish_requests(children, RequestStatus.FINISHED_ABORTED)
            for child_id in children:
                self._child_to_group.pop(child_id, None)

    def has_unfinished_requests(self) -> bool:
        """Requests still running, or a step still in flight (its results may only be discarded work)."""
        return self.scheduler.has_unfinished() or bool(self._planned is not None and self._planned.in_flight)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._groups)

    # ---- the loop -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; return an output for every request group that changed, as its output_kind asks."""
        started = time.perf_counter()
        if self._planned is not None:
            # Step n+1 is planned and running before step n's results are applied below (engine/async_loop.py).
            plan_ahead = plan_ahead_blocker(self.scheduler.requests.values()) is None
            result = self._planned.next_result(plan_ahead, self._last_step_seconds)
            if result is None:
                return self._idle()
            return self._apply(*result, started, self.scheduler.oldest_plan())
        scheduler_output = self.scheduler.schedule()
        scheduler_output.prev_step_seconds = self._last_step_seconds
        runner_output = self.worker.execute(scheduler_output)
        if scheduler_output.is_empty:
            return self._idle()
        return self._apply(scheduler_output, runner_output, started)

    def _idle(self) -> list[RequestOutput]:
        """A step with nothing to run."""
        if self.kv_tiers is not None and self.scheduler.loading:  # only KV loads in flight: wait for one
            self.kv_tiers.wait_for_loads(0.005)
        self._last_step_seconds = None  # an idle gap follows: the next step's predecessor is unknown
        return []

    def _apply(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput, started: float,
               planned: list[Request] | None = None) -> list[RequestOutput]:
        """A step's results: failures, prompt logprobs, the scheduler's update, detokenizing and outputs.
        `planned`: the step's requests when it was planned ahead; those that ended meanwhile are skipped."""
        self.num_steps += 1
        ended = set() if planned is None else {r.request_id for r in planned if r.is_finished}
        for child_id, (field, message) in runner_output.failed.items():
            if child_id not in ended:
                self._fail(child_id, RequestFailedError(message, field))
        for chunk in scheduler_output.chunks:
            entries = runner_output.prompt_logprobs.get(chunk.req_id)
            if entries and chunk.req_id in self._child_to_group and chunk.req_id not in ended:
                self._group_of(chunk.req_id).set_prompt_logprobs(chunk.start_pos, entries)
        changed: dict[str, RequestGroup] = {}
        stopped_by_text: list[str] = []
        for update in self.scheduler.update(scheduler_output, runner_output):
            child = update.request
            if child.request_id not in self._child_to_group:
                continue  # its group failed earlier in this loop
            group = self._group_of(child.request_id)
            logprobs = runner_output.logprobs.get(child.request_id, [])
            try:  # detokenizing is this request's own work: a failure ends it alone
                if group.append_tokens(child, update.new_token_ids, logprobs):
                    stopped_by_text.append(child.request_id)
            except Exception as exc:  # noqa: BLE001
                self._fail(child.request_id, _own_failure(exc))
                changed.pop(group.request_id, None)
                continue
            changed[group.request_id] = group
        if stopped_by_text:
            self.scheduler.finish_requests(stopped_by_text, RequestStatus.FINISHED_STOPPED)
        outputs = []
        for group in changed.values():
            try:
                output = group.make_output()  # None when the request's output_kind asks for nothing yet
            except Exception as exc:  # noqa: BLE001 - building this request's text failed: end it alone
                self._fail(group.child_ids()[0], _own_failure(exc))
                continue
            if output is not None:
                outputs.append(output)
            if group.finished:
                del self._groups[group.request_id]
                for child_id in group.child_ids():
                    self._child_to_group.pop(child_id, None)
        self._last_step_seconds = time.perf_counter() - started
        return outputs

    def _fail(self, child_id: str, error: RequestFailedError) -> None:
        """Abort the request group a failed child belongs to, keeping its error for take_failures()."""
        group_id = self._child_to_group.get(child_id)
        if group_id is None:
            return
        self.failures[group_id] = error
        self.abort_request(group_id)

    def take_failures(self) -> dict[str, RequestFailedError]:
        """Requests aborted since the last call because their own work failed, each with its own error."""
        failures, self.failures = self.failures, {}
        return failures

    def _group_of(self, child_id: str) -> RequestGroup:
        return self._groups[self._child_to_group[child_id]]

    def stats(self) -> dict[str, Any]:
        cache = self.kv_manager.cache
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_blocks_total": self.kv_manager.pool.num_blocks,
            "kv_blocks_used": self.kv_manager.num_used_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queried_tokens": cache.num_queried_tokens,
            "prefix_cache_hit_tokens": cache.num_hit_tokens,
            "num_steps": self.num_steps,
            **self.scheduler.spec_stats_dict(),
            **(self.kv_tiers.stats() if self.kv_tiers is not None else {}),
        }

    def take_kv_events(self) -> list[KVEvent]:
        """KV-tier events (blocks stored in / removed from the host and disk tiers, by hash hex) since the last
        call, oldest first: what a router needs to know where a prefix lives."""
        return self.kv_tiers.take_events() if self.kv_tiers is not None else []

    def persist_kv_cache(self) -> int:
        """Write the cached blocks of the device pool and the host tier to the disk tier, and wait (a planned
        shutdown: the next start of the same model finds them). Blocks written; 0 without a disk tier."""
        if self.kv_tiers is None:
            return 0
        self.kv_tiers.flush()
        return self.kv_tiers.persist([(block.block_id, block_hash)
                                      for block_hash, block in self.kv_manager.cache.cached_blocks()])

    def flush_kv_tiers(self) -> None:
        """Wait until blocks already evicted have reached their tiers (before a planned restart, in tests)."""
        if self.kv_tiers is not None:
            self.kv_tiers.flush()


def _own_failure(exc: Exception) -> RequestFailedError:
    logger.error("a request failed while its output was built; aborting it alone", exc_info=exc)
    return RequestFailedError(f"the engine failed while building this request's output ({type(exc).__name__})")


def _load_tokenizer(model_path: str, required: bool) -> Tokenizer | None:
    if not required and not is_gguf_path(model_path) and not (Path(model_path) / "tokenizer.json").is_file():
        return None
    return Tokenizer.from_pretrained(model_path)


def _eos_token_ids(model_path: str, config_eos: tuple[int, ...], tokenizer: Tokenizer | None) -> tuple[int, ...]:
    """EOS ids from config.json, generation_config.json and the tokenizer, without duplicates."""
    ids: list[int] = list(config_eos)
    generation_config = Path(model_path) / "generation_config.json"
    if generation_config.is_file():
        try:
            value = json.loads(generation_config.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, OSError) as exc:
            raise TokenmillError(f"{generation_config}: not valid JSON ({exc})") from exc
        ids.extend([value] if isinstance(value, int) else list(value or []))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(ids))

