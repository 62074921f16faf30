"""Dense ViT/DeiT + `Architecture` -> a really smaller `CompressedViTForImageClassification`.

Weights are sliced (not masked) and per-unit scales are folded into the producing layer, so the exported model
computes exactly what the dense model computes under `gating.apply_architecture(model, architecture)`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..modeling import CompressedViTConfig, CompressedViTForImageClassification
from ..numerics import assert_finite, model_tensors
from .architecture import Architecture, LayerArchitecture
from .kernels import cross_check_sdpa, kernel_report, kernel_summary, math_fallback_warning
from .targets import BlockParts, ModelParts, model_parts


def _index(indices: list[int], device) -> torch.Tensor:
    return torch.as_tensor(indices, dtype=torch.long, device=device)


def _scale_vector(scale: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    return None if scale is None else scale.detach().to(rows.device, torch.float32)[rows]


def _copy_linear(target: nn.Linear, source: nn.Linear, rows=None, cols=None, row_scale=None,
                 row_positions=None, col_positions=None) -> None:
    """target <- source[rows][:, cols], each kept output row multiplied by row_scale (weight and bias); with
    `row_positions` / `col_positions` the kept rows / columns land at those positions of a wider target and the
    rest are zero (a zero-padded head dim)."""
    weight = source.weight.detach().float()
    bias = source.bias.detach().float() if source.bias is not None else None
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if cols is not None:
        weight = weight[:, cols]
    if row_scale is not None:
        weight = weight * row_scale[:, None]
        bias = bias * row_scale if bias is not None else None
    if row_positions is not None:
        weight = weight.new_zeros(target.out_features, weight.shape[1]).index_copy_(0, row_positions, weight)
        bias = bias.new_zeros(target.out_features).index_copy_(0, row_positions, bias) if bias is not None else None
    if col_positions is not None:
        weight = weight.new_zeros(weight.shape[0], target.in_features).index_copy_(1, col_positions, weight)
    target.weight.copy_(weight)
    if bias is not None:
        target.bias.copy_(bias)


def compressed_config(dense_config, architecture: Architecture, parts: ModelParts) -> CompressedViTConfig:
    """The `CompressedViTConfig` for `architecture` applied to a dense ViT/DeiT config."""
    scaling = parts.blocks[0].attention.scaling if parts.blocks else 1.0
    layers = [
        {
            "num_heads": layer.num_heads,
            "qk_head_dim": layer.exported_head_dims[0],
            "v_head_dim": layer.exported_head_dims[1],
            "intermediate_size": layer.intermediate_size,
            "scaling": float(scaling),
        }
        for layer in architecture.kept_layers
    ]
    return CompressedViTConfig(
        hidden_size=len(architecture.hidden_channels),
        layers=layers,
        image_size=dense_config.image_size,
        patch_size=dense_config.patch_size,
        num_channels=dense_config.num_channels,
        hidden_act=dense_config.hidden_act,
        layer_norm_eps=dense_config.layer_norm_eps,
        qkv_bias=dense_config.qkv_bias,
        initializer_range=dense_config.initializer_range,
        use_distillation_token=parts.num_prefix_tokens == 2,
        distillation_head="distillation_classifier" in parts.heads,
        source_model_type=parts.model_type,
        id2label=dense_config.id2label,
        label2id=dense_config.label2id,
    )


@torch.no_grad()
def export_compressed_model(model: nn.Module, architecture: Architecture) -> CompressedViTForImageClassification:
    """Build the compressed model that keeps exactly the units of `architecture`.

    Args:
        model: the dense (or gated: hooks are ignored here) `ViTForImageClassification` /
            `DeiTForImageClassification(WithTeacher)`.
        architecture: kept heads / channels / neurons / hidden channels / blocks, optional scales to fold in.

    Returns:
        A `CompressedViTForImageClassification` in eval mode, on the dense model's device, in float32. Its
        `config.kernel_support` records which sdpa backends its shapes allow (`hf_vit_compress.surgery.kernels`) and its
        `kernel_report` attribute the per-layer details (with torch's own verdicts when exported on a CUDA device);
        a `UserWarning` names any layer that only sdpa's unfused math fallback can run.

    Raises:
        NonFiniteError: a kept weight (or a folded scale) is NaN/Inf; the message names the exported tensors.
    """
    parts = model_parts(model)
    architecture.validate(model.config, num_blocks=len(parts.blocks))
    config = compressed_config(model.config, architecture, parts)
    config._attn_implementation = getattr(model.config, "_attn_implementation", None) or "sdpa"
    device = parts.patch_projection.weight.device
    report = _kernel_report(config, device)
    compressed = CompressedViTForImageClassification(config).to(device).eval()
    compressed.kernel_report = report

    hidden = _index(architecture.hidden_channels, device)
    hidden_scale = _scale_vector(architecture.hidden_scale, hidden)
    _export_embeddings(compressed.vit.embeddings, parts, hidden, hidden_scale)
    kept_blocks = [(block, layer) for block, layer in zip(parts.blocks, architecture.layers) if layer.keep_block]
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    for target, (block, layer) in zip(compressed.vit.layers, kept_blocks):
        _export_block(target, block, layer, hidden, head_dim)
    _copy_layernorm(compressed.vit.layernorm, parts.final_layernorm, hidden)
    for name, head in parts.heads.items():
        _copy_linear(getattr(compressed, name), head, cols=hidden)
    assert_finite(model_tensors(compressed), "the exported compressed model",
                  "The dense model's kept weights (or the search's scales) are not finite; nothing was exported.")
    return compressed


def architecture_params(model: nn.Module, architecture: Architecture) -> int:
    """Parameters of the model `export_compressed_model(model, architecture)` builds, counted on a copy built on the
    meta device (no weights are allocated or sliced)."""
    config = compressed_config(model.config, architecture, model_parts(model))
    with torch.device("meta"):
        compressed = CompressedViTForImageClassification(config)
    return sum(parameter.numel() for parameter in compressed.parameters())


def _kernel_report(config: CompressedViTConfig, device: torch.device) -> dict:
    """Fill `config.kernel_support`, warn about math-fallback shapes, and cross-check with torch on CUDA."""
    report = kernel_report(config)
    config.kernel_support = kernel_summary(report)
    message = math_fallback_warning(report)
    if message:
        warnings.warn(f"export_compressed_model: {message}", UserWarning, stacklevel=4)
    if device.type == "cuda":
        report["cuda_cross_check"] = cross_check_sdpa(config, torch.bfloat16, device)
        if report["cuda_cross_check"]["mismatches"]:
            warnings.warn("export_compressed_model: surgery.kernels disagrees with torch's sdpa checks on "
                          f"this GPU: {report['cuda_cross_check']['mismatches']}", UserWarning, stacklevel=4)
    return report


def _export_embeddings(target, parts: ModelParts, hidden: torch.Tensor, hidden_scale: torch.Tensor | None) -> None:
    def scaled(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().float()[..., hidden]
        return tensor * hidden_scale if hidden_scale is not None else tensor

    projection = parts.patch_projection
    weight = projection.weight.detach().float()[hidden]
    if hidden_scale is not None:
        weight = weight * hidden_scale[:, None, None, None]
    target.projection.weight.copy_(weight)
    target.projection.bias.copy_(scaled(projection.bias))
    target.cls_token.copy_(scaled(parts.cls_token))
    if parts.distillation_token is not None:
        target.distillation_token.copy_(scaled(parts.distillation_token))
    target.position_embeddings.copy_(scaled(parts.position_embeddings))


def _copy_layernorm(target: nn.LayerNorm, source: nn.LayerNorm, hidden: torch.Tensor) -> None:
    target.weight.copy_(source.weight.detach().float()[hidden])
    target.bias.copy_(source.bias.detach().float()[hidden])


def _export_block(target, block: BlockParts, layer: LayerArchitecture, hidden: torch.Tensor, head_dim: int) -> None:
    device = hidden.device
    _copy_layernorm(target.layernorm_before, block.layernorm_before, hidden)
    _copy_layernorm(target.layernorm_after, block.layernorm_after, hidden)
    qk_rows = _index(layer.flat_indices(head_dim, "qk"), device)
    v_rows = _index(layer.flat_indices(head_dim, "v"), device)
    qk_scale = _scale_vector(layer.qk_scale, qk_rows)
    # where the kept channels sit in the exported projections: packed, or head by head in a zero-padded head dim
    qk_at, v_at = (_padded_positions(layer, which, device) for which in ("qk", "v"))
    attention = target.attention
    _copy_linear(attention.q_proj, block.q_proj, rows=qk_rows, cols=hidden, row_scale=qk_scale, row_positions=qk_at)
    _copy_linear(attention.k_proj, block.k_proj, rows=qk_rows, cols=hidden, row_scale=qk_scale, row_positions=qk_at)
    v_scale = _scale_vector(layer.v_scale, v_rows)
    _copy_linear(attention.v_proj, block.v_proj, rows=v_rows, cols=hidden, row_scale=v_scale, row_positions=v_at)
    _copy_linear(attention.o_proj, block.o_proj, rows=hidden, cols=v_rows, col_positions=v_at)
    neurons = _index(layer.mlp_neurons, device)
    mlp_scale = _scale_vector(layer.mlp_scale, neurons)
    _copy_linear(target.mlp.fc1, block.fc1, rows=neurons, cols=hidden, row_scale=mlp_scale)
    _copy_linear(target.mlp.fc2, block.fc2, rows=hidden, cols=neurons)


def _padded_positions(layer: LayerArchitecture, which: str, device) -> torch.Tensor | None:
    """With `pad_head_dims`, the exported positions of the kept q/k (`which="qk"`) or v channels when it is the
    narrower one: each head's channels first in its padded head dim, zeros after; else None (packed as kept)."""
    kept = layer.qk_head_dim if which == "qk" else layer.v_head_dim
    exported = layer.exported_head_dims[0 if which == "qk" else 1]
    if exported == kept:
        return None
    return _index([head * exported + channel for head in range(layer.num_heads) for channel in range(kept)], device)
