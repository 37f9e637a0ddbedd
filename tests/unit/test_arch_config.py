"""config.json -> ArchConfig for the dense families beyond Llama: both spellings of their settings (what
transformers 5 writes and what older checkpoints carry), and clear errors for what tokenmill does not run."""

from __future__ import annotations

from typing import Any

import pytest

from tokenmill.errors import ModelLoadError
from tokenmill.models.arch_config import parse_arch_config


def config(architecture: str, model_type: str, **fields: Any) -> dict[str, Any]:
    base = dict(architectures=[architecture], model_type=model_type, vocab_size=256, hidden_size=64,
                num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
    return dict(base, **fields)


def test_gemma2_without_layer_types_alternates_local_and_global_layers() -> None:
    arch = parse_arch_config(config("Gemma2ForCausalLM", "gemma2", sliding_window=4096, head_dim=16,
                                    query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                                    final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh"))
    assert arch.sliding_layers == (True, False, True, False, True, False)
    assert arch.sliding_window == 4096
    assert (arch.attn_logit_softcapping, arch.final_logit_softcapping) == (50.0, 30.0)
    assert arch.query_pre_attn_scalar == 256.0 and arch.hidden_act == "gelu_pytorch_tanh"
    assert arch.rope_local_theta is None  # one RoPE for every layer


def test_gemma3_older_spelling_of_rope_and_window_pattern() -> None:
    arch = parse_arch_config(config("Gemma3ForCausalLM", "gemma3_text", sliding_window=512, sliding_window_pattern=3,
                                    rope_theta=1e6, rope_local_base_freq=1e4,
                                    rope_scaling={"rope_type": "linear", "factor": 8.0}))
    assert arch.sliding_layers == (True, True, False, True, True, False)
    assert arch.rope_theta == 1e6 and arch.rope_local_theta == 1e4
    assert arch.rope_scaling == {"rope_type": "linear", "factor": 8.0}


def test_gemma3_rope_per_layer_type_as_transformers_5_writes_it() -> None:
    rope = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    layer_types = ["sliding_attention"] * 5 + ["full_attention"]
    arch = parse_arch_config(config("Gemma3ForCausalLM", "gemma3_text", sliding_window=512, rope_parameters=rope,
                                    layer_types=layer_types))
    assert arch.sliding_layers == (True, True, True, True, True, False)
    assert arch.rope_theta == 1e6 and arch.rope_local_theta == 1e4
    assert arch.rope_scaling is not None and arch.rope_scaling["factor"] == 4.0


def test_gemma3_scaled_local_rope_is_rejected_by_name() -> None:
    rope = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}
    with pytest.raises(ModelLoadError, match="sliding_attention.*linear"):
        parse_arch_config(config("Gemma3ForCausalLM", "gemma3_text", rope_parameters=rope))


def test_phi3_window_covers_every_layer_and_partial_rotary_is_read() -> None:
    arch = parse_arch_config(config("Phi3ForCausalLM", "phi3", sliding_window=2047, partial_rotary_factor=0.75))
    assert arch.sliding_layers == (True,) * 6 and arch.sliding_window == 2047
    assert arch.partial_rotary_factor == 0.75


@pytest.mark.parametrize("kind", ["longrope", "su"])
def test_phi3_long_context_rope_is_rejected_by_name(kind: str) -> None:
    scaling = {"type": kind, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    with pytest.raises(ModelLoadError, match=f"rope scaling type '{kind}'.*rope_scaling"):
        parse_arch_config(config("Phi3ForCausalLM", "phi3", rope_scaling=scaling))


def test_bad_partial_rotary_factor_and_bidirectional_attention_are_rejected() -> None:
    with pytest.raises(ModelLoadError, match="partial_rotary_factor"):
        parse_arch_config(config("Phi3ForCausalLM", "phi3", partial_rotary_factor=1.5))
    with pytest.raises(ModelLoadError, match="use_bidirectional_attention"):
        parse_arch_config(config("Gemma3ForCausalLM", "gemma3_text", use_bidirectional_attention=True))
