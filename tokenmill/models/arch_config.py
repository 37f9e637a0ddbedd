"""ArchConfig: what the model code needs from a checkpoint's config.json, read without transformers.

Reads both spellings of RoPE settings: transformers 5 writes `rope_parameters` (with rope_theta inside; per
layer type for Gemma 3), older checkpoints write top-level `rope_theta`, `rope_scaling` and, for Gemma 3's
local layers, `rope_local_base_freq`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.errors import ModelLoadError


@dataclass(frozen=True)
class ArchConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    sliding_window: int | None
    sliding_layers: tuple[bool, ...]  # per layer: does the sliding window apply
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None
    # Mixtures of experts (0 experts: a dense model).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # each expert's MLP width
    norm_topk_prob: bool = True  # renormalize the top-k routing weights to sum to 1
    moe_layers: tuple[bool, ...] = ()  # per layer: a sparse MoE block (else the dense MLP)
    hidden_act: str = "silu"
    partial_rotary_factor: float = 1.0  # the fraction of each head's features that RoPE turns
    rope_local_theta: float | None = None  # RoPE base of the sliding-window layers when theirs differs (Gemma 3)
    query_pre_attn_scalar: float | None = None  # attention scale is its -1/2 power when set (Gemma)
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None


def read_config_json(model_path: str | Path) -> dict[str, Any]:
    path = Path(model_path)
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"model path {str(path)!r} is not a folder (expected a checkpoint folder)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{config_file}: missing (a checkpoint folder needs config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{config_file}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file}: expected a JSON object")
    return config


def parse_arch_config(config: dict[str, Any], source: str = "config.json") -> ArchConfig:
    def need(key: str) -> Any:
        if key not in config or config[key] is None:
            raise ModelLoadError(f"{source}: missing required field {key!r}")
        return config[key]

    architectures = config.get("architectures") or []
    if not architectures:
        raise ModelLoadError(f"{source}: missing 'architectures' (which model class this checkpoint is)")
    architecture = architectures[0]
    model_type = config.get("model_type", "")
    hidden = int(need("hidden_size"))
    num_heads = int(need("num_attention_heads"))
    num_layers = int(need("num_hidden_layers"))
    rope = config.get("rope_parameters") or {}
    local_rope: dict[str, Any] = {}
    if isinstance(rope.get("full_attention"), dict) or isinstance(rope.get("sliding_attention"), dict):
        # RoPE per layer type (Gemma 3): global layers' settings are the model's, local layers' kept apart.
        local_rope, rope = rope.get("sliding_attention") or {}, rope.get("full_attention") or {}
    is_gemma3 = model_type == "gemma3_text"
    rope_theta = float(config.get("rope_theta") or rope.get("rope_theta") or (1e6 if is_gemma3 else 10000.0))
    scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ("default", "llama3", "linear"):
            raise ModelLoadError(
                f"{source}: rope scaling type {kind!r} (rope_scaling / rope_parameters rope_type) is not supported "
                "(supported: default, llama3, linear)"
            )
        scaling = None if kind == "default" else dict(scaling, rope_type=kind)
    if local_rope.get("rope_type", "default") != "default":
        raise ModelLoadError(f"{source}: rope_parameters.sliding_attention rope_type {local_rope['rope_type']!r} is "
                             "not supported (supported: default)")
    local_theta = local_rope.get("rope_theta") or config.get("rope_local_base_freq") or (1e4 if is_gemma3 else None)
    partial_rotary = float(config.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0)
    if not 0.0 < partial_rotary <= 1.0:
        raise ModelLoadError(f"{source}: partial_rotary_factor {partial_rotary} must be in (0, 1]")
    if config.get("use_bidirectional_attention"):
        raise ModelLoadError(f"{source}: use_bidirectional_attention is not supported (tokenmill generates causally)")

    is_qwen2 = model_type == "qwen2" or architecture == "Qwen2ForCausalLM"
    sliding_window = config.get("sliding_window")
    sliding_layers = tuple(False for _ in range(num_layers))
    if model_type in ("mistral", "mixtral", "phi3") and sliding_window:
        sliding_layers = tuple(True for _ in range(num_layers))
    elif model_type in ("gemma2", "gemma3_text") and sliding_window:
        # Local (sliding) and global layers interleave: layer_types, else every `pattern`-th layer is global.
        pattern = 2 if model_type == "gemma2" else int(config.get("sliding_window_pattern") or 6)
        layer_types = config.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                                    for i in range(num_layers)]
        sliding_layers = tuple(t == "sliding_attention" for t in layer_types)
    elif config.get("use_sliding_window") and sliding_window:
        layer_types = config.get("layer_types") or []
        if layer_types:
            sliding_layers = tuple(t == "sliding_attention" for t in layer_types)
        else:
            max_window_layers = int(config.get("max_window_layers") or 0)
            sliding_layers = tuple(i >= max_window_layers for i in range(num_layers))
    if not any(sliding_layers):
        sliding_window = None

    eos = config.get("eos_token_id")
    eos_ids = tuple([eos] if isinstance(eos, int) else (eos or []))
    return ArchConfig(
        architecture=architecture,
        model_type=model_type,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
        head_dim=int(config.get("head_dim") or hidden // num_heads),
        intermediate_size=int(need("intermediate_size")),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=scaling,
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=True if is_qwen2 else bool(config.get("attention_bias", False)),
        o_bias=False if is_qwen2 else bool(config.get("attention_bias", False)),
        qk_norm=model_type in ("qwen3", "qwen3_moe") or architecture in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
        sliding_window=int(sliding_window) if sliding_window else None,
        sliding_layers=sliding_layers,
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=tuple(int(e) for e in eos_ids),
        torch_dtype=config.get("torch_dtype") or config.get("dtype"),
        hidden_act=str(config.get("hidden_activation") or config.get("hidden_act") or "silu"),
        partial_rotary_factor=partial_rotary,
        rope_local_theta=float(local_theta) if local_theta else None,
        query_pre_attn_scalar=_optional_float(config.get("query_pre_attn_scalar")),
        attn_logit_softcapping=_optional_float(config.get("attn_logit_softcapping")),
        final_logit_softcapping=_optional_float(config.get("final_logit_softcapping")),
        **_moe_fields(config, num_layers, source),
    )


def _moe_fields(config: dict[str, Any], num_layers: int, source: str) -> dict[str, Any]:
    """Expert counts and which layers are sparse: every layer (Mixtral), or every decoder_sparse_step-th
    layer except mlp_only_layers (Qwen3-MoE), as transformers decides."""
    num_experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)
    if num_experts == 0:
        return {}
    top_k = int(config.get("num_experts_per_tok") or 0)
    if not 0 < top_k <= num_experts:
        raise ModelLoadError(f"{source}: num_experts_per_tok ({top_k}) must be between 1 and the number of "
                             f"experts ({num_experts})")
    step = int(config.get("decoder_sparse_step") or 1)
    dense = set(config.get("mlp_only_layers") or [])
    return dict(
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=int(config.get("moe_intermediate_size") or config["intermediate_size"]),
        norm_topk_prob=bool(config.get("norm_topk_prob", True)),
        moe_layers=tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers)),
    )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def read_arch_config(model_path: str | Path) -> ArchConfig:
    return parse_arch_config(read_config_json(model_path), source=str(Path(model_path) / "config.json"))


def parameter_count(arch: ArchConfig) -> int:
    """The parameter count a checkpoint's config implies, without loading its weights."""
    attention = arch.hidden_size * arch.head_dim * (2 * arch.num_heads + 2 * arch.num_kv_heads)
    mlp = 3 * arch.hidden_size * arch.intermediate_size
    moe = arch.num_experts * arch.hidden_size * (3 * arch.moe_intermediate_size + 1)  # experts + router rows
    embeddings = arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
    sparse = sum(arch.moe_layers)
    return arch.num_layers * attention + (arch.num_layers - sparse) * mlp + sparse * moe + embeddings
