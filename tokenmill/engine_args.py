"""EngineArgs: every engine knob once, with its flag and help; CLI flags and LLM(**kwargs) derive from it.

A knob added here reaches `generate`, `chat`, `serve`, `bench` and `LLM(...)` together, so no command can
quietly ignore one. Defaults come from the config dataclasses; the range checks stay in config.py.
"""

from __future__ import annotations

import argparse
import difflib
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from tokenmill.config import (
    ATTENTION_BACKENDS,
    DTYPES,
    KV_CACHE_DTYPES,
    LOAD_FORMATS,
    SPEC_METHODS,
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    SchedulerConfig,
    SpecConfig,
    ThinkingConfig,
)
from tokenmill.byte_sizes import parse_byte_size
from tokenmill.model_catalog import resolve_models
from tokenmill.errors import ConfigError

_FLAG_KEY = "tokenmill_flag"
_GIB = 1 << 30
_SAME = object()  # Flag.cli_default when the command line keeps the field's default


@dataclass(frozen=True)
class Flag:
    """How one EngineArgs field appears on the command line."""

    help: str
    group: str
    choices: tuple[str, ...] | None = None
    # Default: --field-name, or --no-field-name for a bool that defaults to True.
    spelling: str | None = None
    # The command line may default differently from LLM(...) (e.g. device: auto there, cpu here).
    cli_default: Any = _SAME


def _knob(default: Any, help: str, group: str, *, choices: tuple[str, ...] | None = None,
          spelling: str | None = None, cli_default: Any = _SAME) -> Any:
    return field(default=default, metadata={_FLAG_KEY: Flag(help, group, choices, spelling, cli_default)})


_MODEL, _KV, _SCHED, _SPEC, _THINK = "model", "KV cache", "scheduler", "speculative decoding", "reasoning"
_LORA = "LoRA adapters"


@dataclass(frozen=True)
class EngineArgs:
    """The engine's settings, flat, as users name them; `create_engine_config` nests and validates them."""

    model: str | None = _knob(
        None, "checkpoint folder (config.json, *.safetensors, tokenizer.json) or a .gguf file; default: "
        "models/tokenmill-py-13m",
        _MODEL)
    dtype: str = _knob(EngineConfig.dtype, "weight and activation dtype (auto: the checkpoint's)", _MODEL,
                       choices=DTYPES)
    device: str = _knob(EngineConfig.device, "auto (CUDA when present), cpu or cuda[:N]; "
                        "LLM(...) defaults to cpu, the command line to auto", _MODEL,
                        cli_default="auto")
    load_format: str = _knob(EngineConfig.load_format,
                             "random: random weights of the checkpoint's shape (benchmarks)", _MODEL,
                             choices=LOAD_FORMATS)
    max_model_len: int | None = _knob(EngineConfig.max_model_len,
                                      "longest prompt + output in tokens (default: the model's limit)", _MODEL)
    seed: int = _knob(EngineConfig.seed, "engine seed for requests without their own", _MODEL)
    compile: bool | None = _knob(EngineConfig.compile,
                                 "torch.compile the model forward (default: where it measured faster)", _MODEL)
    quantization: str | None = _knob(
        EngineConfig.quantization, "quantize a float checkpoint's linear weights while loading: int8, int4, w2 or "
        "fp8, optionally :gN (group size; int4/w2 default 64) and :sym (no zero-point); a quantized checkpoint "
        "loads as it is, or dequantized with none", _MODEL)
    attention_backend: str = _knob(EngineConfig.attention_backend,
                                   "attention implementation: auto (triton on CUDA when installed, else torch), "
                                   "torch, or triton (CUDA; on a CPU only under TRITON_INTERPRET=1)", _MODEL,
                                   choices=ATTENTION_BACKENDS)
    enforce_eager: bool = _knob(EngineConfig.enforce_eager, "run every step eagerly: no CUDA graphs and no "
                                "torch.compile (wins over --compile)", _MODEL)
    async_scheduling: bool | None = _knob(EngineConfig.async_scheduling,
                                          "plan step n+1 while step n runs (default: on CUDA); runs with "
                                          "speculative decoding, and steps while a grammar-constrained request "
                                          "is live, stay synchronous", _SCHED)

    block_size: int = _knob(CacheConfig.block_size, "tokens per KV block", _KV)
    num_kv_blocks: int | None = _knob(CacheConfig.num_kv_blocks, "exact KV pool size in blocks", _KV)
    kv_cache_memory_gb: float = _knob(CacheConfig.kv_cache_memory_bytes / _GIB,
                                      "KV pool size when --num-kv-blocks is unset", _KV)
    kv_cache_memory: str | int | None = _knob(
        CacheConfig.kv_cache_memory, "fixed KV pool budget in bytes, e.g. 4GiB or 500MB: skips the GPU memory "
        "profile and wins over --kv-cache-memory-gb", _KV)
    gpu_memory_utilization: float = _knob(CacheConfig.gpu_memory_utilization,
                                          "share of the GPU's memory the engine may fill (weights, a worst-case "
                                          "step, KV pool) when the KV pool is sized by profiling", _KV)
    enable_prefix_caching: bool = _knob(CacheConfig.enable_prefix_caching,
                                        "reuse the KV of prompt prefixes seen before", _KV,
                                        spelling="--no-prefix-caching")
    kv_cache_dtype: str = _knob(CacheConfig.kv_cache_dtype,
                                "KV cache storage: auto (the model's dtype), or int8 / fp8 (e4m3) with a scale per "
                                "token and KV head, about twice the tokens of bfloat16 in the same memory", _KV,
                                choices=KV_CACHE_DTYPES)
    kv_host_bytes: str | int = _knob(CacheConfig.kv_host_bytes, "host-RAM KV tier size, e.g. 8GiB: blocks evicted from "
                                     "the device pool are kept there for prefix hits (0: off)", _KV)
    kv_disk_path: str | None = _knob(CacheConfig.kv_disk_path, "folder of the persistent disk KV tier (blocks evicted "
                                     "from the host tier, kept across restarts of the same model)", _KV)
    kv_disk_bytes: str | int = _knob(CacheConfig.kv_disk_bytes, "disk KV tier size, e.g. 50GiB (needed with "
                                     "--kv-disk-path)", _KV)

    max_num_seqs: int = _knob(SchedulerConfig.max_num_seqs, "cap on requests running at once", _SCHED)
    max_num_batched_tokens: int = _knob(SchedulerConfig.max_num_batched_tokens, "token budget per step", _SCHED)

    speculative_method: str | None = _knob(
        SpecConfig.method,
        "draft tokens by prompt lookup (ngram), with a small draft model (draft), by lookup first and the "
        "draft model where the lookup finds nothing (ngram+draft), or with a draft head over the target's hidden "
        "states (eagle)", _SPEC, choices=SPEC_METHODS)
    num_speculative_tokens: int = _knob(SpecConfig.num_speculative_tokens, "the most drafts per request per step",
                                        _SPEC)
    draft_model: str | None = _knob(SpecConfig.draft_model, "draft checkpoint sharing the target's tokenizer "
                                    "(default with the default model: its distilled draft); with eagle, the "
                                    "draft head's folder", _SPEC)
    draft_dtype: str | None = _knob(SpecConfig.draft_dtype, "the draft model's dtype (default: the target's)", _SPEC,
                                    choices=DTYPES)
    ngram_min: int = _knob(SpecConfig.ngram_min, "shortest suffix that prompt lookup matches", _SPEC)
    ngram_max: int = _knob(SpecConfig.ngram_max, "longest suffix that prompt lookup tries first", _SPEC)
    speculative_adaptive: bool = _knob(SpecConfig.adaptive, "adapt the draft length to recent acceptance and "
                                       "measured step costs instead of always drafting the full length", _SPEC)
    draft_confidence_threshold: float = _knob(SpecConfig.draft_confidence_threshold,
                                              "stop drafting when the draft model's top probability falls below this",
                                              _SPEC)

    reasoning_start: str = _knob(ThinkingConfig.start, "tag that opens the model's reasoning", _THINK)
    reasoning_end: str = _knob(ThinkingConfig.end, "tag that closes the model's reasoning", _THINK)
    thinking_wrap_up: str = _knob(ThinkingConfig.wrap_up, "text forced before the end tag when the thinking budget "
                                  "runs out (pass real newlines, e.g. $'\\nTime is up.\\n')", _THINK)

    enable_lora: bool = _knob(False, "serve LoRA adapters on the base model: each request picks one by name "
                              "(docs/lora.md); the forward runs eagerly", _LORA)
    lora_modules: tuple[str, ...] = _knob((), "adapters to load at start, each NAME=PATH (a PEFT adapter folder); "
                                          "needs --enable-lora", _LORA)
    max_loras: int = _knob(LoRAConfig.max_loras, "adapters resident at once (one batch mixes at most this many); "
                           "the others wait in host memory and are swapped in least-recently-used first", _LORA)
    max_lora_rank: int = _knob(LoRAConfig.max_lora_rank, "the largest adapter rank accepted", _LORA)

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """Add every engine flag to `parser`, grouped; each flag's dest is its field name."""
        hints = typing.get_type_hints(cls)
        groups: dict[str, Any] = {}
        for knob in fields(cls):
            flag: Flag = knob.metadata[_FLAG_KEY]
            if flag.group not in groups:
                groups[flag.group] = parser.add_argument_group(flag.group)
            _add_flag(groups[flag.group], knob.name, hints[knob.name], knob.default, flag)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        return cls(**{knob.name: getattr(args, knob.name) for knob in fields(cls)})

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        """EngineArgs from keyword arguments; a name that is not a field raises ConfigError naming it."""
        known = [knob.name for knob in fields(cls)]
        for name in kwargs:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(name, f"is not an engine setting{hint}; the settings are: {', '.join(known)}")
        return cls(**kwargs)

    def create_engine_config(self) -> EngineConfig:
        """The validated EngineConfig; the default model (and its draft) fill in what was not given."""
        gb = self.kv_cache_memory_gb
        if isinstance(gb, bool) or not isinstance(gb, (int, float)) or not gb > 0:  # `not >` also catches NaN
            raise ConfigError("kv_cache_memory_gb", f"must be a number > 0, got {gb!r}")
        model, draft_model = resolve_models(self.model, self.speculative_method, self.draft_model)
        return EngineConfig(
            model=model,
            dtype=self.dtype,
            device=self.device,
            load_format=self.load_format,
            max_model_len=self.max_model_len,
            seed=self.seed,
            cache=CacheConfig(
                block_size=self.block_size,
                num_kv_blocks=self.num_kv_blocks,
                kv_cache_memory_bytes=int(gb * _GIB),
                enable_prefix_caching=self.enable_prefix_caching,
                kv_cache_memory=None if self.kv_cache_memory is None else parse_byte_size("kv_cache_memory",
                                                                                          self.kv_cache_memory),
                gpu_memory_utilization=self.gpu_memory_utilization,
                kv_cache_dtype=self.kv_cache_dtype,
                kv_host_bytes=_byte_count("kv_host_bytes", self.kv_host_bytes),
                kv_disk_path=self.kv_disk_path,
                kv_disk_bytes=_byte_count("kv_disk_bytes", self.kv_disk_bytes),
            ),
            scheduler=SchedulerConfig(max_num_seqs=self.max_num_seqs,
                                      max_num_batched_tokens=self.max_num_batched_tokens),
            spec=SpecConfig(
                method=self.speculative_method,
                num_speculative_tokens=self.num_speculative_tokens,
                draft_model=draft_model,
                draft_dtype=self.draft_dtype,
                ngram_min=self.ngram_min,
                ngram_max=self.ngram_max,
                adaptive=self.speculative_adaptive,
                draft_confidence_threshold=self.draft_confidence_threshold,
            ),
            thinking=ThinkingConfig(start=self.reasoning_start, end=self.reasoning_end, wrap_up=self.thinking_wrap_up),
            compile=self.compile,
            quantization=self.quantization,
            attention_backend=self.attention_backend,
            enforce_eager=self.enforce_eager,
            async_scheduling=self.async_scheduling,
            lora=self._lora_config(),
        )

    def _lora_config(self) -> LoRAConfig | None:
        if not self.enable_lora:
            if self.lora_modules:
                raise ConfigError("lora_modules", "needs enable_lora (--enable-lora)")
            return None
        modules = []
        for spec in self.lora_modules:
            name, sep, path = spec.partition("=") if isinstance(spec, str) else ("", "", "")
            if not sep or not name or not path:
                raise ConfigError("lora_modules", f"each adapter is NAME=PATH, got {spec!r}")
            modules.append((name, path))
        return LoRAConfig(max_loras=self.max_loras, max_lora_rank=self.max_lora_rank, modules=tuple(modules))


def _add_flag(group: Any, name: str, hint: Any, default: Any, flag: Flag) -> None:
    default = default if flag.cli_default is _SAME else flag.cli_default
    members = typing.get_args(hint)
    optional = type(None) in members
    kind = next((m for m in members if m is not type(None)), hint)
    if typing.get_origin(hint) is tuple:  # a list of values: --flag A B C
        group.add_argument(flag.spelling or _spelling(name), dest=name, nargs="+", type=members[0], default=default,
                           help=flag.help)
    elif kind is bool and optional:
        # None leaves the choice to the engine; --x / --no-x decide it.
        group.add_argument(flag.spelling or _spelling(name), dest=name, default=default, help=flag.help,
                           action=argparse.BooleanOptionalAction)
    elif kind is bool:
        spelling = flag.spelling or (_spelling("no_" + name) if default else _spelling(name))
        # The help says what the knob does; a --no- flag says that it turns it off.
        group.add_argument(spelling, dest=name, default=default, action="store_false" if default else "store_true",
                           help=f"{flag.help}; this flag turns it off" if default else flag.help)
    else:
        group.add_argument(flag.spelling or _spelling(name), dest=name, type=kind, default=default,
                           choices=flag.choices, help=flag.help)


def _byte_count(setting: str, value: str | int) -> int:
    """A byte size where 0 means off (parse_byte_size refuses 0)."""
    return 0 if value in (0, "0") else parse_byte_size(setting, value)


def _spelling(name: str) -> str:
    return "--" + name.replace("_", "-")
