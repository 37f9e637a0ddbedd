"""Random PEFT LoRA adapters for tiny test checkpoints, and greedy output of peft's merged model (the reference)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.checkpoints import greedy_tokens

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_peft_adapter(base: str | Path, out_dir: str | Path, *, rank: int, seed: int, alpha: float | None = None,
                      targets: tuple[str, ...] = ALL_TARGETS, use_rslora: bool = False,
                      rank_pattern: dict[str, int] | None = None) -> Path:
    """An adapter folder (adapter_config.json + adapter_model.safetensors) with random, non-zero A and B, large
    enough that the adapter changes greedy output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, target_modules=list(targets),
                        lora_dropout=0.0, use_rslora=use_rslora, rank_pattern=rank_pattern or {})
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                fan = param.shape[1]
                param.copy_(torch.randn(param.shape, generator=generator) * (0.8 / fan ** 0.5))
    out = Path(out_dir)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def merged_greedy(base: str | Path, adapter: str | Path | None, prompts: list[list[int]],
                  max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens of peft's merged model (the base alone when adapter is None), one prompt at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return greedy_tokens(model.eval(), prompts, max_new_tokens)
