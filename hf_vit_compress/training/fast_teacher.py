"""The frozen teacher's forward in fewer operations than transformers' ViT/DeiT forward, same logits.

UVC distils from a frozen copy of the dense model at every step, so the teacher's forward is a fixed part of every
search step (about 480 of the ~2,700 operations dispatched per UVC step on the DeiT-S shape; on a GPU each is a
kernel launch or a dispatch on the host). `FastFrozenForward` replaces the copy's `forward` with one that computes
the same logits with q, k and v from one fused matrix multiply per block and the tokens flattened to a
(batch * tokens, hidden) matrix once, so that every Linear is one `addmm` without reshapes around it: about 20
operations per block instead of about 33. Written by hand: transformers has no fused-QKV ViT, and nothing else here
needs one. Any call it does not cover (other arguments than `pixel_values`, training mode, another image size) runs
transformers' own forward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_outputs import ImageClassifierOutput

from ..surgery.targets import ModelParts, model_parts


class FastFrozenForward:
    """`forward` of a frozen supported ViT/DeiT classifier, as an instance attribute of the model.

    The fused q/k/v weights are non-persistent buffers of each attention module (`fused_qkv_weight`,
    `fused_qkv_bias`): they follow the model's `.to(device / dtype)` and are not saved. The q/k/v parameters stay
    (unused by this forward, still used by transformers' one), so the model's weights and state dict are unchanged.
    The weights must not change afterwards: the fused copies would not follow.

    Args:
        model: a `ViTForImageClassification`, `DeiTForImageClassification` or
            `DeiTForImageClassificationWithTeacher`, frozen.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.parts: ModelParts = model_parts(model)
        for block in self.parts.blocks:
            projections = (block.q_proj, block.k_proj, block.v_proj)
            with torch.no_grad():
                weight = torch.cat([linear.weight for linear in projections])
                bias = None if block.q_proj.bias is None else torch.cat([linear.bias for linear in projections])
            block.attention.register_buffer("fused_qkv_weight", weight, persistent=False)
            block.attention.register_buffer("fused_qkv_bias", bias, persistent=False)
        model.forward = self

    def __call__(self, pixel_values: torch.Tensor | None = None, **kwargs):
        model = self.model
        image_size = tuple(self.parts.patch_embeddings.image_size)
        if kwargs or model.training or pixel_values is None or tuple(pixel_values.shape[-2:]) != image_size:
            return type(model).forward(model, pixel_values=pixel_values, **kwargs)  # transformers' own
        return ImageClassifierOutput(logits=self.logits(pixel_values))

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The classifier's logits (DeiT with two heads: their mean), as transformers computes them."""
        parts = self.parts
        sequence = self._sequence_output(pixel_values)
        heads = list(parts.heads.values())
        logits = [head(sequence[:, index]) for index, head in enumerate(heads)]
        return logits[0] if len(logits) == 1 else (logits[0] + logits[1]) / 2

    def _sequence_output(self, pixel_values: torch.Tensor) -> torch.Tensor:
        parts = self.parts
        projection = parts.patch_projection
        if pixel_values.dtype != projection.weight.dtype:
            pixel_values = pixel_values.to(projection.weight.dtype)
        patches = projection(pixel_values).flatten(2).transpose(1, 2)
        batch = patches.shape[0]
        prefix = [parts.cls_token] + ([parts.distillation_token] if parts.distillation_token is not None else [])
        tokens = torch.cat([token.expand(batch, -1, -1) for token in prefix] + [patches], dim=1)
        tokens = tokens + parts.position_embeddings
        _, length, width = tokens.shape
        hidden = tokens.reshape(batch * length, width)  # every Linear below: one addmm, no reshape around it
        for block in parts.blocks:
            attention = block.attention
            heads, head_dim = block.q_proj.out_features // attention.head_dim, attention.head_dim
            normed = _layer_norm(block.layernorm_before, hidden)
            qkv = F.linear(normed, attention.fused_qkv_weight, attention.fused_qkv_bias)
            query, key, value = qkv.view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            context = F.scaled_dot_product_attention(query, key, value, scale=attention.scaling)
            context = context.transpose(1, 2).reshape(batch * length, heads * head_dim)
            hidden = hidden + F.linear(context, block.o_proj.weight, block.o_proj.bias)
            normed = _layer_norm(block.layernorm_after, hidden)
            hidden = hidden + block.fc2(block.activation(block.fc1(normed)))
        return _layer_norm(parts.final_layernorm, hidden).view(batch, length, width)


def _layer_norm(layernorm: nn.LayerNorm, hidden: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(hidden, layernorm.normalized_shape, layernorm.weight, layernorm.bias, layernorm.eps)


def install_fast_forward(model: nn.Module) -> nn.Module:
    """Give a frozen supported ViT/DeiT classifier `FastFrozenForward` (in place); other models are left alone.

    Args:
        model: the frozen teacher (`distill.frozen_teacher_copy` calls this on its copy).
    """
    try:
        parts = model_parts(model)
    except ValueError:
        return model
    for block in parts.blocks:
        projections = (block.q_proj, block.k_proj, block.v_proj)
        if any(type(linear) is not nn.Linear for linear in projections) or len(
                {linear.bias is None for linear in projections}) != 1:
            return model  # adapted or unusual projections: transformers' forward
    FastFrozenForward(model)
    return model
