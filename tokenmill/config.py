"""Engine configuration: frozen dataclasses, validated where they are built."""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "random")  # random: weights of the checkpoint's shape, for benchmarks
# auto: triton on CUDA when triton is installed, torch otherwise (platform.resolve_attention_backend).
ATTENTION_BACKENDS = ("auto", "torch", "triton")
# auto: the model's dtype; int8 / fp8 (e4m3): quantized with a scale per token and KV head (quant/kv_cache.py)
KV_CACHE_DTYPES = ("auto", "int8", "fp8")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # exact pool size; None sizes it from kv_cache_memory_bytes
    kv_cache_memory_bytes: int = 2 << 30
    enable_prefix_caching: bool = True
    # A fixed KV budget in bytes (--kv-cache-memory): wins over kv_cache_memory_bytes and, on a GPU, skips the
    # memory profile. None: kv_cache_memory_bytes on the CPU, the profile on a GPU.
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9  # share of the GPU's memory the engine may fill when profiling sizes the pool
    kv_cache_dtype: str = "auto"
    # KV tiers below the pool (kv_tiers/, docs/kv_tiers.md): a host-RAM LRU of this many bytes (0: off) and a
    # persistent disk LRU under kv_disk_path bounded by kv_disk_bytes (path None: off). They extend the prefix
    # cache, so with prefix caching off they are not built.
    kv_host_bytes: int = 0
    kv_disk_path: str | None = None
    kv_disk_bytes: int = 0


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048


SPEC_METHODS = ("ngram", "draft", "ngram+draft", "eagle")
# Methods that run a separate draft model (ngram+draft: prompt lookup first, the model where it finds nothing).
DRAFT_MODEL_METHODS = ("draft", "ngram+draft")
# Methods that draft with a head over the target's hidden states; draft_model is then the head's folder.
HEAD_METHODS = ("eagle",)


@dataclass(frozen=True)
class SpecConfig:
    """Speculative decoding: off unless `method` is set."""

    # "ngram" (prompt lookup), "draft" (a separate small model), "ngram+draft" or "eagle" (a draft head)
    method: str | None = None
    num_speculative_tokens: int = 4  # the most drafts per request per step
    draft_model: str | None = None  # the draft model's checkpoint (DRAFT_MODEL_METHODS) or head folder (eagle)
    # The draft's weights and KV may be narrower than the target's: drafts only need to be likely, not exact
    # (verification keeps the output exact). None: the target's dtype.
    draft_dtype: str | None = None
    ngram_min: int = 1
    ngram_max: int = 4
    # Adaptive length: per request from recent acceptance, per batch from step times measured at start.
    adaptive: bool = True
    # A draft-model token whose top probability is below this ends the request's drafting for the step.
    draft_confidence_threshold: float = 0.1

    def validate(self) -> None:
        if self.method is None:
            return
        if self.method not in SPEC_METHODS:
            raise ConfigError(
                "speculative_method", f"must be one of {', '.join(SPEC_METHODS)} (or None), got {self.method!r}"
            )
        _positive("num_speculative_tokens", self.num_speculative_tokens)
        if self.num_speculative_tokens > 16:
            raise ConfigError("num_speculative_tokens", f"must be at most 16, got {self.num_speculative_tokens}")
        if self.method in DRAFT_MODEL_METHODS and not self.draft_model:
            raise ConfigError("draft_model", f"speculative_method {self.method!r} needs a draft_model checkpoint")
        if self.method in HEAD_METHODS and not self.draft_model:
            raise ConfigError("draft_model", f"speculative_method {self.method!r} needs draft_model: the folder of "
                                             f"a draft head (`tokenmill distill --method eagle` writes one)")
        if self.draft_dtype is not None and self.draft_dtype not in DTYPES:
            raise ConfigError(
                "draft_dtype", f"must be one of {', '.join(DTYPES)} (or None), got {self.draft_dtype!r}"
            )
        _positive("ngram_min", self.ngram_min)
        if self.ngram_max < self.ngram_min:
            raise ConfigError("ngram_max", f"must be >= ngram_min ({self.ngram_min}), got {self.ngram_max}")
        if not 0.0 <= self.draft_confidence_threshold < 1.0:
            raise ConfigError(
                "draft_confidence_threshold", f"must be in [0, 1), got {self.draft_confidence_threshold}"
            )


@dataclass(frozen=True)
class ThinkingConfig:
    """How the model marks its reasoning, so the engine can derive the token ids a thinking budget forces.

    `wrap_up` is text forced before the end tag when a request's budget runs out."""

    start: str = "<think>"
    end: str = "</think>"
    wrap_up: str = ""

    def __post_init__(self) -> None:
        # An empty tag is found everywhere: every prompt would open thinking and every text would close it.
        for setting, tag in (("reasoning_start", self.start), ("reasoning_end", self.end)):
            if not isinstance(tag, str) or not tag:
                raise ConfigError(setting, f"must be a non-empty tag, got {tag!r}")


@dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA serving (docs/lora.md): adapters resident at once, the largest rank, and those loaded at start."""

    max_loras: int = 4
    max_lora_rank: int = 16
    modules: tuple[tuple[str, str], ...] = ()  # (name, adapter folder)

    def validate(self) -> None:
        _positive("max_loras", self.max_loras)
        _positive("max_lora_rank", self.max_lora_rank)
        names = [name for name, _ in self.modules]
        for name in names:
            if not isinstance(name, str) or not name:
                raise ConfigError("lora_modules", f"each adapter needs a non-empty name, got {name!r}")
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError("lora_modules", f"adapter names must be unique; repeated: {', '.join(duplicates)}")


@dataclass(frozen=True)
class EngineConfig:
    model: str
    dtype: str = "auto"
    device: str = "cpu"
    load_format: str = "auto"
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    seed: int = 0
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    spec: SpecConfig = SpecConfig()
    thinking: ThinkingConfig = ThinkingConfig()
    # torch.compile (inductor) for the model forward; None: on where it measured faster (see platform.py).
    compile: bool | None = None
    # Weight quantization applied while loading a float checkpoint: METHOD[:gN][:sym], or "none" to load a
    # quantized checkpoint dequantized (quant/settings.py).
    quantization: str | None = None
    attention_backend: str = "auto"
    # No CUDA graphs and no torch.compile, whatever `compile` says (--enforce-eager).
    enforce_eager: bool = False
    # Plan step n+1 while step n runs (engine/async_loop.py); None: the platform's default (platform.py).
    async_scheduling: bool | None = None
    # Multi-LoRA serving; None: off (no LoRA layers, every request runs the base model).
    lora: LoRAConfig | None = None

    def __post_init__(self) -> None:
        self.spec.validate()
        if self.lora is not None:
            self.lora.validate()
        if self.quantization is not None:
            from tokenmill.quant.settings import parse_quantization  # imports torch: only when asked for

            parse_quantization(self.quantization)
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError("load_format", f"must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError("attention_backend",
                              f"must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention_backend!r}")
        _positive("block_size", self.cache.block_size)
        if self.cache.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError("kv_cache_dtype",
                              f"must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.cache.kv_cache_dtype!r}")
        if self.cache.num_kv_blocks is not None:
            _positive("num_kv_blocks", self.cache.num_kv_blocks)
        _positive("max_num_seqs", self.scheduler.max_num_seqs)
        _positive("max_num_batched_tokens", self.scheduler.max_num_batched_tokens)
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
        if self.cache.kv_cache_memory is not None:
            _positive("kv_cache_memory", self.cache.kv_cache_memory)
        self._validate_kv_tiers()
        utilization = self.cache.gpu_memory_utilization
        # `not 0 < u <= 1` also refuses NaN; a bool is not a share.
        if isinstance(utilization, bool) or not isinstance(utilization, (int, float)) or not 0 < utilization <= 1:
            raise ConfigError("gpu_memory_utilization",
                              f"must be a share of the GPU's memory in (0, 1], got {utilization!r}")

    def _validate_kv_tiers(self) -> None:
        cache = self.cache
        for name in ("kv_host_bytes", "kv_disk_bytes"):
            value = getattr(cache, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(name, f"must be a byte count >= 0, got {value!r}")
        if cache.kv_disk_path is not None and (not isinstance(cache.kv_disk_path, str) or not cache.kv_disk_path):
            raise ConfigError("kv_disk_path", f"must be a folder path, got {cache.kv_disk_path!r}")
        if cache.kv_disk_path is not None and cache.kv_disk_bytes < 1:
            raise ConfigError("kv_disk_bytes", "must be > 0 when kv_disk_path is set (how much disk the tier may use, "
                                               "e.g. 20GiB)")
        if cache.kv_disk_path is None and cache.kv_disk_bytes:
            raise ConfigError("kv_disk_path", "is needed when kv_disk_bytes is set (where the disk tier keeps blocks)")
        if cache.kv_host_bytes or cache.kv_disk_path is not None:
            setting = "kv_host_bytes" if cache.kv_host_bytes else "kv_disk_path"
            if self.spec.method in DRAFT_MODEL_METHODS + HEAD_METHODS:
                raise ConfigError(setting, f"KV tiers hold the target's KV only; speculative_method "
                                           f"{self.spec.method!r} keeps a drafter's KV beside it (use ngram)")


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(name, f"must be a positive integer, got {value!r}")
