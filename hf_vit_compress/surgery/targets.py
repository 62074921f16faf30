"""Where things live inside the supported Hugging Face models.

This is the ONLY module that knows transformers' attribute names for ViT and DeiT (transformers >= 5.9, < 6:
`model.<backbone>.layers[i].attention.{q,k,v,o}_proj`, `.mlp.{fc1,fc2}`, `.layernorm_before/after`). Every other
module asks `model_parts(model)` and works with the returned handles, so a rename upstream is fixed here once.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

# model_type -> attribute holding the backbone (ViTModel / DeiTModel) on the *ForImageClassification classes.
_BACKBONE_ATTRIBUTE = {"vit": "vit", "deit": "deit"}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_BACKBONE_ATTRIBUTE)
SUPPORTED_CLASSES: tuple[str, ...] = (
    "ViTForImageClassification",
    "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher",
)


@dataclass(frozen=True)
class BlockParts:
    """Handles on the prunable pieces of one transformer block."""

    block: nn.Module
    attention: nn.Module
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    fc1: nn.Linear
    fc2: nn.Linear
    layernorm_before: nn.LayerNorm
    layernorm_after: nn.LayerNorm
    activation: nn.Module  # the MLP's activation, between fc1 and fc2


@dataclass(frozen=True)
class ModelParts:
    """Handles on every piece of a supported model that compression touches.

    Attributes:
        model_type: `"vit"` or `"deit"`.
        backbone: the `ViTModel` / `DeiTModel`.
        embeddings: the embeddings module (patch projection + class/distillation tokens + positions).
        patch_embeddings: the module whose output is the `(batch, num_patches, hidden)` patch tokens.
        patch_projection: the `Conv2d` patch projection.
        blocks: one `BlockParts` per transformer block, in order.
        final_layernorm: the LayerNorm after the last block.
        heads: classifier name -> Linear, in the order the model reads its prefix tokens
            (`classifier` reads token 0; `cls_classifier` token 0 and `distillation_classifier` token 1).
        num_prefix_tokens: 1 (class token) or 2 (class + distillation token).
    """

    model_type: str
    backbone: nn.Module
    embeddings: nn.Module
    patch_embeddings: nn.Module
    patch_projection: nn.Conv2d
    blocks: tuple[BlockParts, ...]
    final_layernorm: nn.LayerNorm
    heads: dict[str, nn.Linear]
    num_prefix_tokens: int

    @property
    def cls_token(self) -> nn.Parameter:
        return self.embeddings.cls_token

    @property
    def distillation_token(self) -> nn.Parameter | None:
        return getattr(self.embeddings, "distillation_token", None)

    @property
    def position_embeddings(self) -> nn.Parameter:
        return self.embeddings.position_embeddings


def check_supported(model: nn.Module) -> str:
    """Return the model's `model_type`, or raise a ValueError naming it and the supported ones."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    class_name = type(model).__name__
    if not isinstance(model, PreTrainedModel) or model_type not in _BACKBONE_ATTRIBUTE:
        raise ValueError(
            f"Unsupported model: {class_name} with model_type={model_type!r}. hf_vit_compress supports "
            f"model_type in {list(SUPPORTED_MODEL_TYPES)} ({', '.join(SUPPORTED_CLASSES)})."
        )
    # Checked by attribute (not class name) so subclasses work; a *ForMaskedImageModeling has the backbone, no head.
    has_head = hasattr(model, "classifier") or hasattr(model, "cls_classifier")
    if not hasattr(model, _BACKBONE_ATTRIBUTE[model_type]) or not has_head:
        raise ValueError(
            f"Unsupported model class {class_name} (model_type={model_type!r}); expected one of {SUPPORTED_CLASSES}."
        )
    if getattr(config, "head_dim", None) not in (None, config.hidden_size // config.num_attention_heads):
        raise ValueError(f"config.head_dim={config.head_dim} != hidden_size // num_attention_heads is not supported.")
    return model_type


def model_parts(model: nn.Module) -> ModelParts:
    """Locate every piece compression needs in a ViT/DeiT image classifier.

    Args:
        model: a `ViTForImageClassification`, `DeiTForImageClassification` or
            `DeiTForImageClassificationWithTeacher`.

    Raises:
        ValueError: for any other model, naming its model_type and the supported ones.
    """
    model_type = check_supported(model)
    backbone = getattr(model, _BACKBONE_ATTRIBUTE[model_type])
    embeddings = backbone.embeddings
    blocks = tuple(
        BlockParts(
            block=layer,
            attention=layer.attention,
            q_proj=layer.attention.q_proj,
            k_proj=layer.attention.k_proj,
            v_proj=layer.attention.v_proj,
            o_proj=layer.attention.o_proj,
            fc1=layer.mlp.fc1,
            fc2=layer.mlp.fc2,
            layernorm_before=layer.layernorm_before,
            layernorm_after=layer.layernorm_after,
            activation=layer.mlp.activation_fn,
        )
        for layer in backbone.layers
    )
    if hasattr(model, "cls_classifier"):
        heads = {"cls_classifier": model.cls_classifier, "distillation_classifier": model.distillation_classifier}
    else:
        heads = {"classifier": model.classifier}
    return ModelParts(
        model_type=model_type,
        backbone=backbone,
        embeddings=embeddings,
        patch_embeddings=embeddings.patch_embeddings,
        patch_projection=embeddings.patch_embeddings.projection,
        blocks=blocks,
        final_layernorm=backbone.layernorm,
        heads=heads,
        num_prefix_tokens=2 if hasattr(embeddings, "distillation_token") else 1,
    )


def iter_layernorms(parts: ModelParts):
    """Yield (name, LayerNorm) for every LayerNorm on the residual stream (they all see the hidden width)."""
    for index, block in enumerate(parts.blocks):
        yield f"layers.{index}.layernorm_before", block.layernorm_before
        yield f"layers.{index}.layernorm_after", block.layernorm_after
    yield "layernorm", parts.final_layernorm
