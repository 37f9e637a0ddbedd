"""Engine configuration: frozen dataclasses, validated where they are built."""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.errors import InvalidRequestError

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # exact pool size; None sizes it from kv_cache_memory_bytes
    kv_cache_memory_bytes: int = 2 << 30
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048


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

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidRequestError("dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.load_format not in ("auto", "random"):
            raise InvalidRequestError("load_format", f"must be 'auto' or 'random', got {self.load_format!r}")
        _positive("block_size", self.cache.block_size)
        if self.cache.num_kv_blocks is not None:
            _positive("num_kv_blocks", self.cache.num_kv_blocks)
        _positive("max_num_seqs", self.scheduler.max_num_seqs)
        _positive("max_num_batched_tokens", self.scheduler.max_num_batched_tokens)
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidRequestError(name, f"must be a positive integer, got {value!r}")
