"""Mixture-of-experts families on the Llama decoder: Mixtral (Llama attention, sliding window when its
config sets one) and Qwen3-MoE (Qwen3 attention with q/k norms). Only the MLP differs from the dense
families: a sparse MoE block (layers/moe.py) on the layers the config makes sparse, the dense MLP elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tokenmill.errors import ModelLoadError
from tokenmill.layers.linear import QuantMethod
from tokenmill.layers.moe import EXPERT_PARTS, MIXTRAL_EXPERT_PARTS, SparseMoeBlock
from tokenmill.models.arch_config import ArchConfig
from tokenmill.models.llama import LlamaForCausalLM, dense_mlp


def _moe_or_dense(config: ArchConfig, layer_index: int, dtype: torch.dtype, device: torch.device,
                  quant: QuantMethod | None, part_names: Sequence[str], renormalize: bool,
                  weights_in_model_dtype: bool) -> nn.Module:
    if config.num_experts == 0:
        raise ModelLoadError(f"config.json: {config.architecture} is a mixture of experts, but the config names no "
                             "experts (num_local_experts or num_experts)")
    if not config.moe_layers[layer_index]:
        return dense_mlp(config, layer_index, dtype, device, quant)
    # Experts are unquantized whatever `quant` says: quantization methods cover 2-d linear layers only.
    return SparseMoeBlock(config.hidden_size, config.moe_intermediate_size, config.num_experts,
                          config.num_experts_per_tok, renormalize, weights_in_model_dtype, dtype, device,
                          part_names)


def mixtral_mlp(config: ArchConfig, layer_index: int, dtype: torch.dtype, device: torch.device,
                quant: QuantMethod | None) -> nn.Module:
    # Mixtral always renormalizes its top-k weights, and keeps them in float32 to weight the experts' outputs.
    return _moe_or_dense(config, layer_index, dtype, device, quant, MIXTRAL_EXPERT_PARTS, True, False)


def qwen3_moe_mlp(config: ArchConfig, layer_index: int, dtype: torch.dtype, device: torch.device,
                  quant: QuantMethod | None) -> nn.Module:
    return _moe_or_dense(config, layer_index, dtype, device, quant, EXPERT_PARTS, config.norm_topk_prob, True)


class MixtralForCausalLM(LlamaForCausalLM):
    # Published Mixtral checkpoints call the MoE block `block_sparse_moe`; transformers 5 (and we) say `mlp`.
    checkpoint_renames = {".block_sparse_moe.": ".mlp."}
    make_mlp = staticmethod(mixtral_mlp)


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    make_mlp = staticmethod(qwen3_moe_mlp)
