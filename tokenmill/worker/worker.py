"""The device worker: built from the engine config, it owns the model, its KV cache and sampling state.

    worker = Worker(config, drafter)      # loads the model
    num_blocks = worker.profile()         # how many KV blocks fit the budget
    worker.init_cache(num_blocks)         # allocate them; compile and warm up
    output = worker.execute(scheduler_output)   # every step: SchedulerOutput -> ModelRunnerOutput

That contract is all that crosses between the engine and the worker, so a worker in another process (tensor
parallel ranks, disaggregated prefill) is a transport problem. The worker keeps each request's sampling
state from the first step it sees the request until the scheduler reports it finished.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

from tokenmill.config import EngineConfig
from tokenmill.core.request import draft_room
from tokenmill.core.sched_io import ModelRunnerOutput, NewRequestData, ScheduledChunk, SchedulerOutput
from tokenmill.errors import ConfigError
from tokenmill.layers.linear import UnquantizedLinearMethod
from tokenmill.lora.manager import LoRAManager
from tokenmill.models.gguf import is_gguf_path
from tokenmill.models.arch_config import parameter_count
from tokenmill.models.loader import checkpoint_config_dict, load_model, read_checkpoint_arch
from tokenmill.platform import (attention_backend, cpu_bf16_prepack_available, cpu_native_bf16, default_compile,
                                fp8_matmul_available, resolve_device, triton_available)
from tokenmill.quant.methods import linear_method_for
from tokenmill.sample.sampler import Sampler
from tokenmill.sample.state import SamplingState, make_generator
from tokenmill.sample.thinking_budget import ThinkingBudgetTracker
from tokenmill.worker import sampling
from tokenmill.worker.async_step import record_last_tokens, without_failed_earlier
from tokenmill.worker.cuda_graphs import DecodeGraphs, capture_cuda_graph, capture_sizes, graphs_usable
from tokenmill.worker.drafter import Drafter, DraftRequest, StepHiddenStates
from tokenmill.worker.grammar_masks import GrammarBackend, GrammarMasks, without_failed_rows
from tokenmill.worker.input_batch import StepInputs
from tokenmill.worker.kv_cache_alloc import (allocate_kv_caches, bytes_per_block, check_pool_holds_context,
                                             resolve_kv_cache_dtype)
from tokenmill.worker.memory_sizing import GpuMemoryProfile, kv_cache_budget, measure_gpu_memory, run_worst_case_step
from tokenmill.worker.model_runner import ModelRunner
from tokenmill.worker.request_failures import RequestFailures
from tokenmill.worker.step_isolation import aligned_output, without_failing_requests
from tokenmill.worker.step_timer import time_forward

DrafterFactory = Callable[[torch.device, int, torch.nn.Module], Drafter]  # (device, target vocab, target) -> drafter


class Worker:
    def __init__(self, config: EngineConfig, drafter_factory: DrafterFactory | None = None,
                 show_progress: bool = False) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        # Chosen before the slow load, so a backend that cannot run here fails first.
        self.attention_backend = attention_backend(self.device, config.attention_backend,
                                                   quantized_kv=config.cache.kv_cache_dtype != "auto")
        num_params = parameter_count(read_checkpoint_arch(config.model))  # compile is decided before loading
        self.compile = default_compile(self.device, num_params) if config.compile is None else config.compile
        # LoRA slots are refilled between steps: a compiled forward (frozen weights) or a graph would keep stale ones.
        self.eager = config.enforce_eager or config.lora is not None
        self.compile = self.compile and not self.eager
        # Eager CPU runs its bf16 matmuls on prepacked weights; a compiled forward lets inductor pack its own.
        float_method = UnquantizedLinearMethod(prepack_cpu=not self.compile and cpu_bf16_prepack_available())
        quant = linear_method_for(config.quantization, checkpoint_config_dict(config.model), config.load_format,
                                  float_method, loader_quantizes=is_gguf_path(config.model),
                                  use_triton=self.device.type == "cuda" and triton_available(),
                                  fp8_scaled_mm=fp8_matmul_available(self.device),
                                  native_bf16=self.device.type == "cpu" and cpu_native_bf16())
        self.model, self.arch = load_model(config.model, dtype=config.dtype, device=self.device,
                                           load_format=config.load_format, progress=show_progress, quant=quant)
        self.dtype: torch.dtype = self.model.model.embed_tokens.weight.dtype
        self.lora = None if config.lora is None else LoRAManager(self.model, config.lora.max_loras,
                                                                 config.lora.max_lora_rank, self.dtype, self.device)
        # What the target's KV pages are stored as: the model's dtype, or int8 / fp8 codes with scales.
        self.kv_dtype = resolve_kv_cache_dtype(config.cache.kv_cache_dtype, self.dtype, self.device)
        self.max_model_len = config.max_model_len or self.arch.max_position_embeddings
        if self.max_model_len > self.arch.max_position_embeddings:
            raise ConfigError("max_model_len", f"{self.max_model_len} exceeds the model's max_position_embeddings "
                                               f"({self.arch.max_position_embeddings})")
        # Speculative decoding comes as a factory (the engine's), so this module never imports it.
        self.drafter = drafter_factory(self.device, self.arch.vocab_size, self.model) if drafter_factory else None
        self.show_progress = show_progress
        self.sampler = Sampler(global_seed=config.seed, device=self.device)
        self.states: dict[str, SamplingState] = {}
        self.grammar_backend: GrammarBackend | None = None
        self.grammar_masks: GrammarMasks | None = None
        self.runner = ModelRunner(self.model, self.compile)
        self.num_blocks = 0
        self._last_decode_step: tuple[int, int] | None = None  # (decoding requests, tokens) of a decode-only step
        self._failed_last_step: dict[str, tuple[str | None, str]] = {}  # left out of a step planned ahead of it

    @property
    def num_lookahead_tokens(self) -> int:
        return self.drafter.num_lookahead_tokens if self.drafter is not None else 0

    @property
    def compile_seconds(self) -> float:
        return self.runner.compile_seconds

    def profile(self) -> int:
        """How many KV blocks the configured pool holds (a drafter's KV shares the block ids)."""
        cache = self.config.cache
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks
        per_block = bytes_per_block(self.model.attention_layers(), cache.block_size, self.kv_dtype)
        if self.drafter is not None:
            per_block += self.drafter.kv_bytes_per_block(cache.block_size)
        return kv_cache_budget(cache, self.device, self._measure_gpu_memory,
                               self.config.scheduler.max_num_batched_tokens) // per_block

    def _measure_gpu_memory(self) -> GpuMemoryProfile:
        scheduler = self.config.scheduler
        num_tokens = min(scheduler.max_num_batched_tokens, self.max_model_len)
        return measure_gpu_memory(self.device, lambda: run_worst_case_step(
            self.model, self.model.attention_layers(), num_tokens, scheduler.max_num_seqs,
            self.config.cache.block_size, self.kv_dtype, self.device, self.runner.forward_tokens))

    def init_cache(self, num_blocks: int) -> None:
        block_size = self.config.cache.block_size
        check_pool_holds_context(num_blocks, block_size, self.max_model_len)
        self.num_blocks = num_blocks
        backend = self.attention_backend
        scheduler = self.config.scheduler
        graph_sizes = capture_sizes(scheduler.max_num_seqs, scheduler.max_num_batched_tokens) \
            if graphs_usable(self.device, self.eager, backend, self.model) else []
        # With graphs the pool has one block more than the scheduler hands out: the padding rows' scratch block.
        allocate_kv_caches(self.model.attention_layers(), num_blocks + bool(graph_sizes), block_size, self.kv_dtype,
                           self.device, backend)
        max_blocks = -(-(self.max_model_len + self.num_lookahead_tokens) // block_size)
        self.runner.allocate_inputs(scheduler.max_num_batched_tokens, max_blocks, block_size, self.device,
                                    max_graph_batch=max(graph_sizes, default=0))
        if self.compile:
            if self.show_progress:
                print("compiling the model forward (torch.compile, once per start) ...", file=sys.stderr, flush=True)
            self.runner.warm_up(self._warm_up_steps())
            if self.show_progress:
                print(f"compiled in {self.runner.compile_seconds:.1f} s", file=sys.stderr, flush=True)
        if graph_sizes:
            self.runner.capture_graphs(DecodeGraphs(graph_sizes, pad_block=num_blocks),
                                       capture_cuda_graph())
        if self.drafter is not None:
            self.drafter.init_cache(num_blocks, block_size)
            self.drafter.profile(self.time_target_step, scheduler.max_num_seqs, scheduler.max_num_batched_tokens)

    def enable_structured_output(self, backend: GrammarBackend) -> None:
        self.grammar_backend = backend
        self.grammar_masks = GrammarMasks(backend, self.arch.vocab_size, overlap=self.device.type != "cpu")

    def time_target_step(self, num_tokens: int) -> float:
        """Seconds of one target forward over num_tokens tokens laid out as decodes (for the cost model)."""
        num_seqs = min(num_tokens, 256)
        return time_forward(self.model, num_seqs, -(-num_tokens // num_seqs), self.config.cache.block_size,
                            self.device, forward=self.runner.forward_tokens)

    # ---- the step ------------------------------------------------------------------------------

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        started = time.perf_counter()
        # A request whose own work fails (its grammar, its state) is left out of the rest of the step and
        # reported in output.failed; the step goes on for everyone else.
        failures = RequestFailures()
        earlier, self._failed_last_step = self._failed_last_step, failures.failed
        self._update_requests(scheduler_output, failures)
        if not scheduler_output.chunks:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[], failed=failures.failed)
        model_pass = self._run_model(scheduler_output, failures, earlier)
        if model_pass is None:  # every request of the step failed
            return aligned_output(scheduler_output, ModelRunnerOutput([], [], failed=failures.failed))
        step, inputs, plain, grammar, hidden, logits, prepared = model_pass
        chunks = step.chunks  # the scheduled chunks less those whose presence made the model pass fail
        forwarded = time.perf_counter()
        sampled: list[list[int]] = [[] for _ in chunks]
        output = ModelRunnerOutput(req_ids=[c.req_id for c in chunks], sampled_token_ids=sampled,
                                   failed=failures.failed)
        if logits is not None:
            self._sample(step, inputs, logits, plain, grammar, output, failures)
            record_last_tokens(self.runner.input_batch, chunks, sampled)  # what a placeholder next step stands for
        sampling.prompt_logprobs(chunks, self.states, hidden, self.model.compute_logits, output)
        sampled_at = time.perf_counter()
        drafted = any(c.num_spec_tokens for c in chunks)
        if self.drafter is not None and self.drafter.needs_hidden_states:  # a reference: hidden is not copied
            self.drafter.observe_hidden_states(StepHiddenStates(inputs.input_ids, inputs.positions, inputs.attention,
                                                                hidden[: inputs.num_tokens]))
        if self.drafter is not None and inputs.sampling_chunks:
            self._propose_drafts(step, inputs, output, failures)
        finished = time.perf_counter()
        if self.drafter is not None and inputs.sampling_chunks:
            self.drafter.observe_step(inputs.num_tokens, drafted, finished - started)
        decode_only = all(len(c.token_ids) == 1 + c.num_spec_tokens and c.sample for c in chunks)
        self._last_decode_step = (len(chunks), sum(len(s) for s in sampled)) if decode_only else None
        output.timings = {"prepare_s": prepared - started, "forward_s": forwarded - prepared,
                          "sample_s": sampled_at - forwarded, "propose_s": finished - sampled_at,
                          "execute_s": finished - started}
        return output if step is scheduler_output else aligned_output(scheduler_output, output)

    def _run_model(self, scheduler_output: SchedulerOutput, failures: RequestFailures,
                   earlier: dict[str, tuple[str | None, str]]) -> _ModelPass | None:
        """The step's model pass. When it raises, the requests whose presence alone makes it fail are found
        (worker/step_isolation.py), reported as failed, and the pass runs without them."""
        try:
            scheduler_output = without_failed_earlier(scheduler_output, earlier, failures)
            return self._model_pass(scheduler_output, failures) if scheduler_output.chunks else None
        except Exception as exc:  # noqa: BLE001 - attributed to requests, or raised again
            step_error = exc
        kept = without_failing_requests(scheduler_output, failures, self._probe, step_error)
        return self._model_pass(kept, failures) if kept.chunks else None

    def _probe(self, subset: SchedulerOutput) -> None:
        """The model pass of a subset of a step's chunks, for step isolation (raises what the pass raises)."""
        inputs = self.runner.prepare(subset)
        hidden = self.runner.forward(inputs)
        if inputs.sampling_chunks:
            self.runner.logits(hidden, inputs)

    def _model_pass(self, step: SchedulerOutput, failures: RequestFailures) -> _ModelPass:
        """Inputs, grammar masks started, the forward and the sampling rows' logits of one step."""
        chunks = step.chunks
        inputs = self.runner.prepare(step)
        plain = [(c, r) for c, r in zip(inputs.sampling_chunks, inputs.logits_row_starts)
                 if not chunks[c].num_spec_tokens and chunks[c].req_id not in failures]
        grammar = self._start_grammar_masks(step, plain)
        prepared = time.perf_counter()
        try:
            hidden = self.runner.forward(inputs)
            logits = self.runner.logits(hidden, inputs) if inputs.sampling_chunks else None
        except BaseException:
            if grammar is not None:  # the mask thread must be done with the matchers before anyone retries
                grammar[0].exception()
            raise
        return _ModelPass(step, inputs, plain, grammar, hidden, logits, prepared)

    def _update_requests(self, scheduler_output: SchedulerOutput, failures: RequestFailures) -> None:
        if self.drafter is not None and self._last_decode_step is not None and scheduler_output.prev_step_seconds:
            # Judged before this step drafts again: the drafter still holds what the previous step proposed.
            self.drafter.observe_decode_step(*self._last_decode_step, scheduler_output.prev_step_seconds)
        self._last_decode_step = None
        input_batch = self.runner.input_batch
        assert input_batch is not None, "init_cache() must run before execute()"
        # Finished first: a finished id may already belong to a new request reusing it (offline callers choose
        # their own ids), whose state must survive.
        for req_id in scheduler_output.finished_req_ids:
            self.states.pop(req_id, None)
            input_batch.remove(req_id)
            if self.drafter is not None:
                self.drafter.finished(req_id)
        for new in scheduler_output.new_requests:
            with failures.guard(new.req_id):
                self.states[new.req_id] = self._new_state(new)
        if self.lora is not None:
            self.lora.load_slots(scheduler_output.lora_loads)
        for req_id in scheduler_output.resumed_req_ids:
            input_batch.reset_blocks(req_id)
            if self.drafter is not None:
                self.drafter.resumed(req_id)

    def _new_state(self, new: NewRequestData) -> SamplingState:
        params = new.sampling_params
        grammar = None
        if params.structured_outputs is not None:
            if self.grammar_backend is None:
                raise RuntimeError("a structured request reached a worker without structured output enabled")
            grammar = self.grammar_backend.matcher(params.structured_outputs)
        return SamplingState(
            params=params,
            prompt_token_ids=new.prompt_token_ids,
            output_token_ids=[],
            generator=None if params.seed is None else make_generator(params.seed, self.device),
            grammar=grammar,
            thinking=ThinkingBudgetTracker(params) if params.thinking_token_budget is not None else None,
        )

    def _start_grammar_masks(self, scheduler_output: SchedulerOutput, plain: list[tuple[int, int]]) -> Any:
        chunks = scheduler_output.chunks
        rows = [i for i, (c, _) in enumerate(plain) if self.states[chunks[c].req_id].grammar is not None]
        if not rows or self.grammar_masks is None:
            return None
        pending = self.grammar_masks.start([self.states[chunks[plain[i][0]].req_id].grammar for i in rows])
        return None if pending is None else (pending, rows)

    def _sample(self, scheduler_output: SchedulerOutput, inputs: StepInputs, logits: torch.Tensor,
                plain: list[tuple[int, int]], grammar: Any, output: ModelRunnerOutput,
                failures: RequestFailures) -> None:
        chunks = scheduler_output.chunks
        mask = self._resolve_grammar_masks(chunks, plain, grammar, failures)
        forced = sampling.forced_tokens(chunks, plain, self.states, failures)
        plain, mask = without_failed_rows(chunks, plain, mask, failures)
        if plain:
            rows = logits if len(plain) == logits.shape[0] else logits[[r for _, r in plain]]
            states = [self.states[chunks[c].req_id] for c, _ in plain]
            step_forced = [forced.get(chunks[c].req_id) for c, _ in plain]
            tokens, entries = sampling.sample_plain(self.sampler, rows, states, mask, step_forced)
            for (chunk_index, _), state, token, entry, forced_token in zip(plain, states, tokens, entries, step_forced):
                req_id = chunks[chunk_index].req_id
                with failures.guard(req_id):
                    if state.thinking is not None:
                        state.thinking.observe(token, forced=forced_token is not None)
                    sampling.record(state, [token])
                if req_id in failures:
                    continue
                output.sampled_token_ids[chunk_index].append(token)
                if entry is not None:
                    output.logprobs.setdefault(chunks[chunk_index].req_id, []).append(entry)
        verifying = [(c, r) for c, r in zip(inputs.sampling_chunks, inputs.logits_row_starts)
                     if chunks[c].num_spec_tokens and chunks[c].req_id not in failures]
        if verifying:
            assert self.drafter is not None
            states = [self.states[chunks[c].req_id] for c, _ in verifying]
            results = sampling.verify_drafts(self.drafter, self.sampler.generator, [chunks[c] for c, _ in verifying],
                                             states, [r for _, r in verifying], logits)
            for (chunk_index, _), state, (emitted, entries) in zip(verifying, states, results):
                with failures.guard(chunks[chunk_index].req_id):
                    sampling.record(state, emitted)
                if chunks[chunk_index].req_id in failures:
                    continue
                output.sampled_token_ids[chunk_index].extend(emitted)
                if entries:
                    output.logprobs.setdefault(chunks[chunk_index].req_id, []).extend(entries)

    def _resolve_grammar_masks(self, chunks: list[ScheduledChunk], plain: list[tuple[int, int]], grammar: Any,
                               failures: RequestFailures) -> Any:
        """The step's grammar masks as (bitmask, rows into plain); a request whose mask failed is recorded."""
        if grammar is None:
            return None
        pending, rows = grammar
        result = pending.result()
        for mask_row, error in result.failed.items():
            failures.record(chunks[plain[rows[mask_row]][0]].req_id, error)
        return result.bitmask, rows

    def _propose_drafts(self, scheduler_output: SchedulerOutput, inputs: StepInputs, output: ModelRunnerOutput,
                        failures: RequestFailures) -> None:
        """Drafts for every request that goes on decoding, returned to the scheduler for the next step."""
        assert self.drafter is not None
        candidates = []
        sampling_chunks = set(inputs.sampling_chunks)
        num_other_tokens = 0
        for index, chunk in enumerate(scheduler_output.chunks):
            if index not in sampling_chunks or chunk.req_id in failures:
                num_other_tokens += len(chunk.token_ids)
                continue
            state = self.states[chunk.req_id]
            # Forced thinking-budget tokens and grammar-masked tokens are not verified like free ones:
            # those requests decode without drafts.
            room = self._draft_room(state) if state.thinking is None and state.grammar is None else 0
            if room > 0:
                token_ids = state.prompt_token_ids + state.output_token_ids
                candidates.append(DraftRequest(chunk.req_id, token_ids, state, chunk.block_table, room))
        # The next step is measurable (decodes alone) only if no prefill continues or waits to start.
        prefill_next = num_other_tokens > 0 or scheduler_output.num_waiting > 0
        output.spec_token_ids = self.drafter.propose(candidates, num_other_tokens, prefill_next)

    def _draft_room(self, state: SamplingState) -> int:
        """Drafts the request could still use next step (none while it is finishing or has no output yet)."""
        params, generated = state.params, state.output_token_ids
        if not generated:
            return 0
        last = generated[-1]
        if len(generated) >= params.min_tokens and (
            last in params.stop_token_ids or (not params.ignore_eos and last in params.eos_token_ids)
        ):
            return 0
        assert self.drafter is not None
        room = draft_room(len(state.prompt_token_ids) + len(generated), len(generated), params.max_tokens,
                          self.max_model_len)
        return min(room, self.drafter.num_speculative_tokens)

    def _warm_up_steps(self) -> Iterator[StepInputs]:
        """Synthetic steps of the shapes serving will see (a prefill chunk, a decode), to compile early.

        They write KV into the first blocks before any request owns them."""
        input_batch = self.runner.input_batch
        assert input_batch is not None
        chunk_len = min(64, self.config.scheduler.max_num_batched_tokens, self.max_model_len - 1)
        table = list(range(-(-chunk_len // self.config.cache.block_size) + 1))
        for req_id, length in (("warm-up-prefill", chunk_len), ("warm-up-decode", 1)):
            chunk = ScheduledChunk(req_id, [0] * length, 0, table, sample=True)
            yield input_batch.prepare(SchedulerOutput(chunks=[chunk]))
            input_batch.remove(req_id)


class _ModelPass(NamedTuple):
    step: SchedulerOutput  # what ran: the scheduled step, less requests whose presence made it fail
    inputs: StepInputs
    plain: list[tuple[int, int]]  # (chunk index, logits row) of the chunks that sample without drafts
    grammar: Any  # the pending grammar masks and their rows, or None
    hidden: torch.Tensor
    logits: torch.Tensor | None  # None when no chunk samples
    prepared_at: float
