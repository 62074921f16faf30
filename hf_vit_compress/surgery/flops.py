"""Multiply-accumulates (MACs, the papers' "FLOPs") of dense, gated and compressed ViT/DeiT models.

One formula serves everyone: `block_macs` takes widths that may be Python numbers (exact count of a concrete
model) or tensors (the methods' differentiable expected MACs). Counted: every matrix product the model runs
(patch projection, q/k/v/o, q @ k^T, attn @ v, fc1, fc2, the classifier heads), i.e. what
`torch.utils.flop_counter.FlopCounterMode` counts under eager attention, divided by 2. Not counted: LayerNorms,
softmax, activations, bias adds, residual adds (each O(N*D), under 1% of a ViT).
"""

from __future__ import annotations

import collections.abc
from dataclasses import dataclass

import torch
from torch import nn

from .architecture import Architecture


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, collections.abc.Iterable) else (value, value)


@dataclass(frozen=True)
class Geometry:
    """What MACs depend on besides per-block widths.

    Attributes:
        tokens: sequence length N (patches + class/distillation tokens).
        num_patches: number of patch tokens.
        patch_dim: inputs per patch (channels * patch height * patch width).
        num_labels: classifier outputs.
        num_heads_out: number of classifier heads (2 for DeiT with teacher).
        hidden_size, num_layers, num_heads, head_dim, intermediate_size: the dense model's shapes.
    """

    tokens: int
    num_patches: int
    patch_dim: int
    num_labels: int
    num_heads_out: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    intermediate_size: int


def geometry(model_or_config, image_size: int | tuple[int, int] | None = None) -> Geometry:
    """The `Geometry` of a dense or compressed model (or its config) at `image_size` (default: the config's)."""
    config = getattr(model_or_config, "config", model_or_config)
    height, width = _pair(image_size if image_size is not None else config.image_size)
    patch_h, patch_w = _pair(config.patch_size)
    num_patches = (height // patch_h) * (width // patch_w)
    if config.model_type == "compressed_vit":
        prefix = config.num_prefix_tokens
        heads_out = 2 if config.distillation_head else 1
        num_layers = len(config.layers)
        num_heads = head_dim = intermediate = 0  # per-layer, see config.layers
    else:
        prefix = 2 if config.model_type == "deit" else 1
        module = model_or_config if isinstance(model_or_config, nn.Module) else None
        heads_out = 2 if module is not None and hasattr(module, "distillation_classifier") else 1
        num_layers, num_heads = config.num_hidden_layers, config.num_attention_heads
        head_dim, intermediate = config.hidden_size // num_heads, config.intermediate_size
    return Geometry(
        tokens=num_patches + prefix,
        num_patches=num_patches,
        patch_dim=config.num_channels * patch_h * patch_w,
        num_labels=config.num_labels,
        num_heads_out=heads_out,
        hidden_size=config.hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
    )


def block_macs(tokens, hidden, qk_width, v_width, mlp_width):
    """MACs of one transformer block.

    Args:
        tokens: sequence length N.
        hidden: residual width D (number or tensor).
        qk_width: total query (= key) channels, heads * qk_head_dim.
        v_width: total value channels, heads * v_head_dim.
        mlp_width: MLP hidden width.
    """
    projections = tokens * hidden * (2 * qk_width + v_width) + tokens * v_width * hidden
    attention = tokens * tokens * (qk_width + v_width)
    mlp = 2 * tokens * hidden * mlp_width
    return projections + attention + mlp


def stem_and_head_macs(geo: Geometry, hidden):
    """MACs outside the blocks: the patch projection and the classifier head(s)."""
    return geo.num_patches * geo.patch_dim * hidden + geo.num_heads_out * hidden * geo.num_labels


def macs_from_widths(geo: Geometry, hidden, qk_widths, v_widths, mlp_widths, run_weights=None):
    """Total MACs from per-block widths; differentiable when the widths are tensors.

    Args:
        geo: the model's `Geometry`.
        hidden: residual width (shared by all blocks).
        qk_widths, v_widths, mlp_widths: one entry per block.
        run_weights: optional per-block weight of the block's cost (1 = runs, 0 = skipped; a probability for
            expected MACs under block skipping).
    """
    total = stem_and_head_macs(geo, hidden)
    for index, (qk, v, mlp) in enumerate(zip(qk_widths, v_widths, mlp_widths)):
        cost = block_macs(geo.tokens, hidden, qk, v, mlp)
        total = total + (cost if run_weights is None else run_weights[index] * cost)
    return total


def macs_from_width_tensors(geo: Geometry, hidden, qk_widths, v_widths, mlp_widths, run_weights=None):
    """`macs_from_widths` for per-block widths given as one tensor per kind (shape `(num_layers,)`): the same formula
    applied to all blocks at once (a few tensor ops, however many blocks), differentiable in every tensor argument.
    """
    cost = block_macs(geo.tokens, hidden, qk_widths, v_widths, mlp_widths)
    if run_weights is not None:
        cost = run_weights * cost
    return stem_and_head_macs(geo, hidden) + cost.sum()


def dense_macs(model_or_config, image_size=None) -> int:
    """MACs of the dense ViT/DeiT shape described by `model_or_config`."""
    geo = geometry(model_or_config, image_size)
    width = geo.num_heads * geo.head_dim
    return int(
        macs_from_widths(
            geo,
            geo.hidden_size,
            [width] * geo.num_layers,
            [width] * geo.num_layers,
            [geo.intermediate_size] * geo.num_layers,
        )
    )


def architecture_macs(model_or_geometry, architecture: Architecture, image_size=None) -> int:
    """MACs of the model that `export_compressed_model(model, architecture)` would build.

    Args:
        model_or_geometry: the dense model (or its config, or its `Geometry`).
        architecture: the kept units.
        image_size: input resolution; defaults to the config's (ignored for a `Geometry`).
    """
    geo = model_or_geometry if isinstance(model_or_geometry, Geometry) else geometry(model_or_geometry, image_size)
    kept = architecture.kept_layers
    return int(
        macs_from_widths(
            geo,
            len(architecture.hidden_channels),
            [layer.num_heads * layer.exported_head_dims[0] for layer in kept],
            [layer.num_heads * layer.exported_head_dims[1] for layer in kept],
            [layer.intermediate_size for layer in kept],
        )
    )


def count_macs(model_or_config, image_size: int | tuple[int, int] | None = None) -> int:
    """Exact MACs of one image through a dense ViT/DeiT or a `CompressedViTForImageClassification`.

    Args:
        model_or_config: the model, or its config (for DeiT with teacher pass the model: the config does not say
            whether there are two heads).
        image_size: input resolution; defaults to the config's `image_size`.
    """
    config = getattr(model_or_config, "config", model_or_config)
    if config.model_type != "compressed_vit":
        return dense_macs(model_or_config, image_size)
    geo = geometry(model_or_config, image_size)
    layers = config.layers
    return int(
        macs_from_widths(
            geo,
            config.hidden_size,
            [layer["num_heads"] * layer["qk_head_dim"] for layer in layers],
            [layer["num_heads"] * layer["v_head_dim"] for layer in layers],
            [layer["intermediate_size"] for layer in layers],
        )
    )


def count_params(model: nn.Module) -> int:
    """Number of parameters (the compression gates, if attached, included)."""
    return sum(parameter.numel() for parameter in model.parameters())


def measured_macs(model: nn.Module, pixel_values: torch.Tensor) -> float:
    """MACs per image measured by `torch.utils.flop_counter.FlopCounterMode` (which counts 2 FLOPs per MAC).

    Use eager attention: under sdpa on CPU the counter misses q @ k^T and attn @ v.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # Parameters are frozen while counting: under no_grad a view of a parameter (a 0-head block returns its o_proj
    # bias expanded) reports requires_grad=True without a grad_fn, which crashes the counter's module tracker.
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    try:
        for parameter in trainable:
            parameter.requires_grad_(False)
        with torch.no_grad(), counter:
            model(pixel_values)
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
    return counter.get_total_flops() / 2 / pixel_values.shape[0]
