"""Gates on an unmodified Hugging Face ViT/DeiT: forward hooks that scale unit outputs, and LayerNorms that see
only the kept residual channels.

The HF attention code is left alone (sdpa/eager/flex are still dispatched by transformers): a gate scales the
OUTPUT units of q_proj / k_proj / v_proj / fc1 (folded into the weight rows and bias, which is the same product but
costs a (out, in) multiply instead of a (batch, tokens, out) one) and of the embeddings, and a block gate mixes a
block's output with its input. Parameter names and the state dict are unchanged.
A method supplies the multipliers through a `MaskProvider`; they are computed once per model forward (a pre-hook
on the top module) so that shared masks (q, k and v share one) are built once and autograd sees one graph.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from .architecture import Architecture
from .targets import ModelParts, model_parts


@dataclass
class Masks:
    """Multipliers for one forward pass; `None` anywhere means "leave as is".

    Attributes:
        qk: per block, `(num_heads * head_dim,)` multiplier of the q and k projections' outputs.
        v: per block, `(num_heads * head_dim,)` multiplier of the v projection's output.
        mlp: per block, `(intermediate_size,)` multiplier of fc1's output (before the activation).
        hidden: `(hidden_size,)` multiplier of the embeddings' output (patches, prefix tokens and positions).
        hidden_keep: `(hidden_size,)` 0/1 indicator of the channels every LayerNorm normalises over; the others
            leave a LayerNorm as 0.
        block_gates: per block, `(skip_weight, run_weight)`: output = run * block(x) + skip * x.
    """

    qk: list[torch.Tensor | None] = field(default_factory=list)
    v: list[torch.Tensor | None] = field(default_factory=list)
    mlp: list[torch.Tensor | None] = field(default_factory=list)
    hidden: torch.Tensor | None = None
    hidden_keep: torch.Tensor | None = None
    block_gates: list[tuple[torch.Tensor | float, torch.Tensor | float] | None] = field(default_factory=list)


class MaskProvider(Protocol):
    def compute_masks(self) -> Masks: ...


class MaskedLayerNorm(nn.Module):
    """A LayerNorm over a subset of channels, sharing the wrapped LayerNorm's parameters (same state-dict keys).

    Mean and variance are taken over the kept channels only, and dropped channels come out as 0, so the result on
    kept channels equals a LayerNorm of the sliced width: what the exported model computes.
    """

    def __init__(self, layernorm: nn.LayerNorm, state: "GateHandle"):
        super().__init__()
        self.weight = layernorm.weight
        self.bias = layernorm.bias
        self.eps = layernorm.eps
        self.normalized_shape = layernorm.normalized_shape
        self._original = [layernorm]  # a list: not registered as a submodule, restored on removal
        self._state = [state]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        masks = self._state[0].current
        keep = masks.hidden_keep if masks is not None else None
        if keep is None:
            return nn.functional.layer_norm(hidden_states, self.normalized_shape, self.weight, self.bias, self.eps)
        # Statistics in float32 (as nn.LayerNorm does under autocast).
        x = hidden_states.float()
        keep = keep.to(x.dtype)
        count = keep.sum()
        mean = (x * keep).sum(-1, keepdim=True) / count
        centered = (x - mean) * keep
        variance = centered.pow(2).sum(-1, keepdim=True) / count
        normed = centered * torch.rsqrt(variance + self.eps)
        out = (normed * self.weight.float() + self.bias.float()) * keep
        return out.to(hidden_states.dtype)


def _scale_output(mask_of):
    def hook(module, args, output):
        mask = mask_of()
        return output if mask is None else output * mask.to(output.dtype)

    return hook


def _gated_linear_forward(linear: nn.Linear, mask_of):
    """A forward for `linear` whose output unit j is scaled by mask[j]: x @ (m * W)^T + m * b."""

    def forward(input: torch.Tensor) -> torch.Tensor:
        mask = mask_of()
        if mask is None:
            return nn.functional.linear(input, linear.weight, linear.bias)
        mask = mask.to(linear.weight.dtype)
        bias = linear.bias * mask if linear.bias is not None else None
        return nn.functional.linear(input, linear.weight * mask[:, None], bias)

    return forward


class GateHandle:
    """Hooks and LayerNorm swaps installed on a model; `remove()` restores the model exactly."""

    def __init__(self, model: nn.Module, provider: MaskProvider, parts: ModelParts | None = None):
        self.model = model
        self.provider = provider
        self.parts = parts or model_parts(model)
        self.current: Masks | None = None
        self.enabled = True
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._gated_linears: list[nn.Linear] = []
        self._mask_getters: dict[nn.Linear, Callable[[], torch.Tensor | None]] = {}
        self._swapped: list[tuple[nn.Module, str, nn.LayerNorm]] = []
        self._install()

    # -- installation -------------------------------------------------------------------------------------------
    def _install(self) -> None:
        parts = self.parts
        self._hooks.append(self.model.register_forward_pre_hook(self._refresh_masks))
        self._hooks.append(parts.embeddings.register_forward_hook(_scale_output(lambda: self._get("hidden"))))
        for index, block in enumerate(parts.blocks):
            self._gate_linear(block.q_proj, lambda i=index: self._get("qk", i))
            self._gate_linear(block.k_proj, lambda i=index: self._get("qk", i))
            self._gate_linear(block.v_proj, lambda i=index: self._get("v", i))
            self._gate_linear(block.fc1, lambda i=index: self._get("mlp", i))
            self._hooks.append(block.block.register_forward_hook(self._block_gate(index), with_kwargs=True))
        for parent, name in self._layernorm_slots():
            original = getattr(parent, name)
            setattr(parent, name, MaskedLayerNorm(original, self))
            self._swapped.append((parent, name, original))
        if hasattr(self.provider, "install_hooks"):
            self.provider.install_hooks()

    def _gate_linear(self, linear: nn.Linear, mask_of) -> None:
        # An instance attribute shadows nn.Linear.forward; deleting it restores the class's forward.
        linear.forward = _gated_linear_forward(linear, mask_of)
        self._gated_linears.append(linear)
        self._mask_getters[linear] = mask_of

    def gates_output_of(self, linear: nn.Module) -> bool:
        """Whether this handle gates `linear`'s output units (q/k/v projections and fc1)."""
        return linear in self._mask_getters

    def gate_like(self, linear: nn.Linear, gated: nn.Linear) -> None:
        """Gate `linear`'s output units with `gated`'s mask (folded into its weight rows, like `gated`'s; undone by
        `remove()`). For a Linear whose output is added to `gated`'s, such as a LoRA update's B: the dense model
        then computes what the exported model, which keeps only the gated Linear's kept units, computes."""
        self._gate_linear(linear, self._mask_getters[gated])

    def _layernorm_slots(self):
        for block in self.parts.blocks:
            yield block.block, "layernorm_before"
            yield block.block, "layernorm_after"
        yield self.parts.backbone, "layernorm"

    def _refresh_masks(self, module, args):
        self.current = self.provider.compute_masks() if self.enabled else None

    def _get(self, kind: str, index: int | None = None):
        masks = self.current
        if masks is None:
            return None
        value = getattr(masks, kind)
        if index is None:
            return value
        return value[index] if index < len(value) else None

    def _block_gate(self, index: int):
        def hook(module, args, kwargs, output):
            gate = self._get("block_gates", index)
            if gate is None:
                return output
            skip, run = gate
            block_input = args[0] if args else kwargs["hidden_states"]
            if isinstance(run, (int, float)) and run == 0:
                return block_input  # a removed block contributes nothing (and no NaN can leak through 0 * x)
            return run * output + skip * block_input

        return hook

    def remove(self) -> None:
        if hasattr(self.provider, "remove_hooks"):
            self.provider.remove_hooks()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for linear in self._gated_linears:
            del linear.forward
        self._gated_linears.clear()
        self._mask_getters.clear()
        for parent, name, original in self._swapped:
            setattr(parent, name, original)
        self._swapped.clear()
        self.current = None


def install_gates(model: nn.Module, provider: MaskProvider) -> GateHandle:
    """Attach gates to `model`; the provider's `compute_masks()` runs at the start of every forward.

    Args:
        model: a supported ViT/DeiT classifier (see `targets.py`).
        provider: anything with `compute_masks() -> Masks`. If it is an `nn.Module` holding parameters, attach it
            to the model yourself (as the trainer does) so optimizers, DDP and checkpoints see it.
    """
    return GateHandle(model, provider)


class StaticMasks:
    """A `MaskProvider` that returns the fixed masks of an `Architecture`."""

    def __init__(self, architecture: Architecture, parts: ModelParts, device=None):
        self.masks = architecture_masks(architecture, parts, device=device)

    def compute_masks(self) -> Masks:
        return self.masks


def _unit_mask(size: int, kept: list[int], scale: torch.Tensor | None, device) -> torch.Tensor | None:
    if len(kept) == size and scale is None:
        return None
    mask = torch.zeros(size, device=device)
    index = torch.as_tensor(kept, dtype=torch.long, device=device)
    mask[index] = 1.0 if scale is None else scale.detach().to(device=device, dtype=torch.float32)[index]
    return mask


def architecture_masks(architecture: Architecture, parts: ModelParts, device=None) -> Masks:
    """The hard masks under which the dense model computes exactly what the exported model computes."""
    config = parts.backbone.config
    architecture.validate(config, num_blocks=len(parts.blocks))
    head_dim = config.hidden_size // config.num_attention_heads
    width = config.num_attention_heads * head_dim
    device = device or parts.patch_projection.weight.device
    masks = Masks()
    for layer in architecture.layers:
        masks.qk.append(_unit_mask(width, layer.flat_indices(head_dim, "qk"), layer.qk_scale, device))
        masks.v.append(_unit_mask(width, layer.flat_indices(head_dim, "v"), layer.v_scale, device))
        masks.mlp.append(_unit_mask(config.intermediate_size, layer.mlp_neurons, layer.mlp_scale, device))
        masks.block_gates.append(None if layer.keep_block else (1.0, 0.0))
    masks.hidden = _unit_mask(config.hidden_size, architecture.hidden_channels, architecture.hidden_scale, device)
    if len(architecture.hidden_channels) < config.hidden_size:
        masks.hidden_keep = _unit_mask(config.hidden_size, architecture.hidden_channels, None, device)
    return masks


@contextmanager
def apply_architecture(model: nn.Module, architecture: Architecture):
    """Run the dense `model` with the units that `architecture` drops masked to zero (and its scales applied)."""
    parts = model_parts(model)
    handle = GateHandle(model, StaticMasks(architecture, parts), parts)
    try:
        yield handle
    finally:
        handle.remove()
