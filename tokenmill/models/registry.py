"""Hugging Face `architectures` name -> tokenmill model class."""

from __future__ import annotations

from torch import nn

from tokenmill.errors import ModelLoadError
from tokenmill.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.models.moe_models import MixtralForCausalLM, Qwen3MoeForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Phi3ForCausalLM": LlamaForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
}


def model_class_for(architecture: str, source: str = "config.json") -> type[nn.Module]:
    cls = MODEL_CLASSES.get(architecture)
    if cls is None:
        supported = ", ".join(sorted(MODEL_CLASSES))
        raise ModelLoadError(f"{source}: architecture {architecture!r} is not supported (supported: {supported})")
    return cls
