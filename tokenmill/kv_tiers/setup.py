"""Build the KV tiers for an engine from its config and its worker's KV cache (None when they are off)."""

from __future__ import annotations

import logging

import torch

from tokenmill.config import EngineConfig
from tokenmill.kv_tiers.block_io import BlockIO
from tokenmill.kv_tiers.connector import TierConnector
from tokenmill.kv_tiers.identity import engine_identity

logger = logging.getLogger(__name__)


def build_kv_tiers(config: EngineConfig, attention_layers: list, num_blocks: int, model_dtype: torch.dtype,
                   kv_dtype: torch.dtype) -> TierConnector | None:
    cache = config.cache
    if not cache.kv_host_bytes and cache.kv_disk_path is None:
        return None
    if not cache.enable_prefix_caching:
        logger.warning("KV tiers (kv_host_bytes / kv_disk_path) extend the prefix cache, which is off: not used")
        return None
    tensors = [layer.kv_cache for layer in attention_layers]
    tensors += [layer.kv_scales for layer in attention_layers if layer.kv_scales is not None]
    block_io = BlockIO(tensors, num_blocks)
    identity = engine_identity(config, _name(model_dtype), _name(kv_dtype), block_io.layout())
    return TierConnector(block_io, cache.block_size, cache.kv_host_bytes, cache.kv_disk_path, cache.kv_disk_bytes,
                         identity)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
