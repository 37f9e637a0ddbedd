"""Build the speculator an engine config asks for, as the worker's drafter factory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tokenmill.config import DRAFT_MODEL_METHODS, HEAD_METHODS, EngineConfig
from tokenmill.errors import ConfigError
from tokenmill.models.loader import load_model, read_checkpoint_arch
from tokenmill.sample.state import make_generator
from tokenmill.spec_decode.draft_model import DraftModelProposer
from tokenmill.spec_decode.eagle import EagleProposer
from tokenmill.spec_decode.eagle_head import load_eagle_head
from tokenmill.spec_decode.lookup_then_draft import LookupThenDraftProposer
from tokenmill.spec_decode.ngram import NgramProposer
from tokenmill.spec_decode.proposer import Proposer
from tokenmill.spec_decode.speculator import Speculator
from tokenmill.worker.kv_cache_alloc import resolve_kv_cache_dtype


def build_speculator(config: EngineConfig, device: torch.device, target_vocab_size: int,
                     target: torch.nn.Module | None = None) -> Speculator:
    """The speculator for config.spec (whose method must be set), with its draft model or head loaded if any.

    target: the loaded target model, whose embedding and LM head a draft head shares."""
    spec = config.spec
    if spec.method in HEAD_METHODS:
        if target is None:
            raise ConfigError("speculative_method", f"{spec.method!r} drafts from a loaded target model")
        proposer: Proposer = build_eagle_proposer(config, target, device, target_vocab_size)
    else:
        draft_model = load_draft_model(config, device, target_vocab_size) if spec.method in DRAFT_MODEL_METHODS \
            else None
        proposer = build_proposer(config, draft_model, device, target_vocab_size)
    return Speculator(proposer, spec.num_speculative_tokens, adaptive=spec.adaptive)


def build_eagle_proposer(config: EngineConfig, target: torch.nn.Module, device: torch.device,
                         target_vocab_size: int) -> EagleProposer:
    """The head of config.spec.draft_model, checked against the target, in the target's dtype."""
    dtype = target.model.embed_tokens.weight.dtype
    head = load_eagle_head(str(config.spec.draft_model), target, read_checkpoint_arch(config.model), dtype, device)
    return EagleProposer(head, resolve_kv_cache_dtype(config.cache.kv_cache_dtype, dtype, device), device,
                         target_vocab_size, make_generator(config.seed + 1, device), config.spec.num_speculative_tokens,
                         config.spec.draft_confidence_threshold)


def load_draft_model(config: EngineConfig, device: torch.device, target_vocab_size: int) -> torch.nn.Module:
    """Load the draft checkpoint and check that it speaks the target's vocabulary."""
    draft_path = str(config.spec.draft_model)
    _check_same_vocab(config.model, draft_path)
    dtype = config.spec.draft_dtype or config.dtype
    model, arch = load_model(draft_path, dtype=dtype, device=device, load_format=config.load_format)
    if arch.vocab_size < target_vocab_size // 2 or arch.vocab_size > target_vocab_size * 2:
        raise ConfigError(
            "draft_model",
            f"its vocabulary ({arch.vocab_size}) does not match the target's ({target_vocab_size}); "
            f"a draft model must share the target's tokenizer",
        )
    return model


def build_proposer(
    config: EngineConfig, draft_model: torch.nn.Module | None, device: torch.device, target_vocab_size: int
) -> Proposer:
    spec = config.spec
    if spec.method == "ngram":
        return NgramProposer(spec.ngram_min, spec.ngram_max)
    assert draft_model is not None
    model = DraftModelProposer(
        draft_model,
        # The draft keeps its KV in its own dtype, quantized as the target's when kv_cache_dtype asks: its
        # blocks share the pool's budget, so int8 KV doubles the tokens of both.
        resolve_kv_cache_dtype(config.cache.kv_cache_dtype, next(draft_model.parameters()).dtype, device),
        device,
        target_vocab_size,
        make_generator(config.seed + 1, device),  # unseeded requests' draft samples (the sampler has seed)
        spec.num_speculative_tokens,
        spec.draft_confidence_threshold,
    )
    if spec.method == "ngram+draft":
        return LookupThenDraftProposer(NgramProposer(spec.ngram_min, spec.ngram_max), model)
    return model


def _check_same_vocab(target_path: str, draft_path: str) -> None:
    target, draft = Path(target_path) / "tokenizer.json", Path(draft_path) / "tokenizer.json"
    if not (target.is_file() and draft.is_file()):
        return  # random-weight benchmarks may have no tokenizer; vocab sizes are still checked
    try:
        target_vocab = json.loads(target.read_text())["model"]["vocab"]
        draft_vocab = json.loads(draft.read_text())["model"]["vocab"]
    except (json.JSONDecodeError, KeyError, TypeError, OSError):
        return
    if target_vocab != draft_vocab:
        raise ConfigError("draft_model", f"{draft} differs from {target}: the draft must share the tokenizer")
