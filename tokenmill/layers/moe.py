"""Mixture of experts: a top-k router and SwiGLU experts whose weights are stacked, one slab per expert.

The experts' weights are two 3-d parameters, gate_up_proj [E, 2I, H] (gate rows, then up rows, like the
fused gate/up linear) and down_proj [E, H, I]: the layout transformers 5 keeps in memory, so a checkpoint
saved from its state dict loads by name, and a kernel can index any expert's matrices. Published
checkpoints store one tensor per expert and projection (experts.N.gate_proj, Mixtral's experts.N.w1/w3/w2);
those are slices of the stacked parameters: `checkpoint_parts` names them for the loader and
`weight_loader` places each.

The computation is `kernels.reference.fused_experts`: one matmul per active expert over all its tokens.
Under torch.compile it is one opaque custom op (its expert loop depends on the routing), like attention.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from tokenmill.errors import ModelLoadError
from tokenmill.kernels.reference import fused_experts, select_experts
from tokenmill.layers.linear import ReplicatedLinear, _parameter

# Checkpoint names of one expert's projections: (gate, up, down).
EXPERT_PARTS = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_EXPERT_PARTS = ("w1", "w3", "w2")

_layer_ids = itertools.count()
_layers: weakref.WeakValueDictionary[int, FusedExperts] = weakref.WeakValueDictionary()


class FusedExperts(nn.Module):
    # The experts' matmuls are sized by token counts read on the host: a CUDA graph cannot capture that.
    cuda_graph_safe = False

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype,
                 device: torch.device, part_names: Sequence[str] = EXPERT_PARTS) -> None:
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.part_names = tuple(part_names)
        # Allocated empty, like the linear layers: the loader (or random init) fills them.
        self.gate_up_proj = _parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype, device=device), self.weight_loader)
        self.down_proj = _parameter(
            torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype, device=device), self.weight_loader)
        self.expert_calls = 0  # expert matmuls run so far: grows with the experts a step uses, never its tokens
        self.layer_id = next(_layer_ids)  # how the compiled graph's custom op finds this layer
        _layers[self.layer_id] = self

    def checkpoint_parts(self) -> dict[str, tuple[str, str]]:
        """Per-expert checkpoint tensor (relative name) -> (parameter, shard "expert.half" or "expert")."""
        gate, up, down = self.part_names
        parts: dict[str, tuple[str, str]] = {}
        for expert in range(self.num_experts):
            parts[f"{expert}.{gate}.weight"] = ("gate_up_proj", f"{expert}.gate")
            parts[f"{expert}.{up}.weight"] = ("gate_up_proj", f"{expert}.up")
            parts[f"{expert}.{down}.weight"] = ("down_proj", str(expert))
        return parts

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
        """The whole stacked tensor (shard None), one expert's matrix, or one half of its gate/up rows."""
        target = param.data
        if shard is not None:
            expert, _, half = shard.partition(".")
            if not expert.isdigit() or int(expert) >= self.num_experts or half not in ("", "gate", "up"):
                raise ModelLoadError(f"{type(self).__name__} has no shard {shard!r} ({self.num_experts} experts)")
            target = target[int(expert)]
            if half:
                size = self.intermediate_size
                target = target.narrow(0, 0 if half == "gate" else size, size)
        if tuple(loaded.shape) != tuple(target.shape):
            raise ModelLoadError(f"shape {tuple(loaded.shape)} does not fit {tuple(target.shape)}")
        target.copy_(loaded)  # converts dtype and moves to the layer's device

    def forward(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], each token's expert weights and ids [T, k] -> [T, H]."""
        if torch.compiler.is_compiling():
            return torch.ops.tokenmill.fused_experts(hidden, topk_weights, topk_ids, self.layer_id)
        return self.compute(hidden, topk_weights, topk_ids)

    def compute(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return fused_experts(hidden, self.gate_up_proj, self.down_proj, topk_weights, topk_ids, self._count_call)

    def _count_call(self, expert: int, num_tokens: int) -> None:
        self.expert_calls += 1


class SparseMoeBlock(nn.Module):
    """The MLP of a mixture-of-experts layer: the router (`gate`) picks each token's top-k experts and the
    token's output is their outputs weighted by the routing weights.

    `renormalize`: the top-k weights are divided by their sum (Mixtral always; Qwen3-MoE with norm_topk_prob).
    `weights_in_model_dtype`: the weights are cast to the activations' dtype before weighting (Qwen3-MoE's
    rounding; Mixtral weights in float32).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, renormalize: bool,
                 weights_in_model_dtype: bool, dtype: torch.dtype, device: torch.device,
                 part_names: Sequence[str] = EXPERT_PARTS) -> None:
        super().__init__()
        self.top_k, self.renormalize, self.weights_in_model_dtype = top_k, renormalize, weights_in_model_dtype
        # The router stays unquantized whatever the experts use: it is tiny and routing is sensitive to it.
        self.gate = ReplicatedLinear(hidden_size, num_experts, False, dtype, device)
        self.experts = FusedExperts(num_experts, hidden_size, intermediate_size, dtype, device, part_names)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(self.gate(hidden), self.top_k, self.renormalize)
        if self.weights_in_model_dtype:
            weights = weights.to(hidden.dtype)
        return self.experts(hidden, weights, ids)


@torch.library.custom_op("tokenmill::fused_experts", mutates_args=())
def _fused_experts_op(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                      layer_id: int) -> torch.Tensor:
    return _layers[layer_id].compute(hidden, topk_weights, topk_ids)


@_fused_experts_op.register_fake
def _(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_id: int) -> torch.Tensor:
    return hidden.new_empty(hidden.shape)
