"""`hf_vit_compress.surgery.targets.model_parts`: handles on the supported models, clear errors for everything else."""

from __future__ import annotations

import pytest
import torch
from conftest import make_deit_classifier, make_deit_with_teacher, make_vit_classifier, tiny_vit_config
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    SwinConfig,
    SwinForImageClassification,
    ViTForMaskedImageModeling,
    ViTModel,
)

from hf_vit_compress.surgery.targets import SUPPORTED_MODEL_TYPES, iter_layernorms, model_parts

SUPPORTED = [
    pytest.param(make_vit_classifier, "vit", ["classifier"], 1, id="ViTForImageClassification"),
    pytest.param(make_deit_classifier, "deit", ["classifier"], 2, id="DeiTForImageClassification"),
    pytest.param(
        make_deit_with_teacher,
        "deit",
        ["cls_classifier", "distillation_classifier"],
        2,
        id="DeiTForImageClassificationWithTeacher",
    ),
]


@pytest.mark.parametrize(("make_model", "model_type", "head_names", "num_prefix_tokens"), SUPPORTED)
def test_model_parts_of_supported_models(make_model, model_type, head_names, num_prefix_tokens):
    model = make_model(num_hidden_layers=3)
    parts = model_parts(model)
    backbone = getattr(model, model_type)

    assert parts.model_type == model_type
    assert parts.num_prefix_tokens == num_prefix_tokens
    assert parts.backbone is backbone
    assert parts.embeddings is backbone.embeddings
    assert parts.patch_embeddings is backbone.embeddings.patch_embeddings
    assert parts.patch_projection is backbone.embeddings.patch_embeddings.projection
    assert isinstance(parts.patch_projection, torch.nn.Conv2d)
    assert parts.final_layernorm is backbone.layernorm
    assert parts.cls_token is backbone.embeddings.cls_token
    assert parts.position_embeddings is backbone.embeddings.position_embeddings
    assert parts.position_embeddings.shape[1] == 16 + num_prefix_tokens
    if num_prefix_tokens == 2:
        assert parts.distillation_token is backbone.embeddings.distillation_token
    else:
        assert parts.distillation_token is None

    assert list(parts.heads) == head_names
    for name, head in parts.heads.items():
        assert head is getattr(model, name)
        assert isinstance(head, torch.nn.Linear) and head.weight.shape == (5, 32)

    assert len(parts.blocks) == 3
    for block, layer in zip(parts.blocks, backbone.layers, strict=True):
        assert block.block is layer
        assert block.attention is layer.attention
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert getattr(block, name) is getattr(layer.attention, name)
            assert isinstance(getattr(block, name), torch.nn.Linear)
        assert block.fc1 is layer.mlp.fc1 and block.fc2 is layer.mlp.fc2
        assert block.fc1.weight.shape == (64, 32) and block.fc2.weight.shape == (32, 64)
        assert block.layernorm_before is layer.layernorm_before
        assert block.layernorm_after is layer.layernorm_after
    assert len({id(block.q_proj) for block in parts.blocks}) == 3  # distinct modules per block

    names = [name for name, _ in iter_layernorms(parts)]
    assert names == [
        "layers.0.layernorm_before", "layers.0.layernorm_after",
        "layers.1.layernorm_before", "layers.1.layernorm_after",
        "layers.2.layernorm_before", "layers.2.layernorm_after",
        "layernorm",
    ]  # fmt: skip
    assert dict(iter_layernorms(parts))["layernorm"] is backbone.layernorm


def test_handles_are_live(vit_model):
    """Editing a handle edits the model (compression relies on writing through the handles)."""
    parts = model_parts(vit_model)
    pixel_values = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        before = vit_model(pixel_values=pixel_values).logits
        parts.heads["classifier"].bias.add_(1.0)
        after = vit_model(pixel_values=pixel_values).logits
    torch.testing.assert_close(after, before + 1.0)


def _tiny_bert():
    config = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


def _tiny_swin():
    config = SwinConfig(
        image_size=16, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=2, num_labels=5
    )
    return SwinForImageClassification(config).eval()


@pytest.mark.parametrize(
    ("make_model", "model_type"),
    [pytest.param(_tiny_bert, "bert", id="bert"), pytest.param(_tiny_swin, "swin", id="swin")],
)
def test_unsupported_model_types_are_rejected(make_model, model_type):
    model = make_model()
    assert model.config.model_type == model_type
    with pytest.raises(ValueError) as error:
        model_parts(model)
    message = str(error.value)
    assert model_type in message
    assert type(model).__name__ in message
    for supported in ("vit", "deit"):
        assert f"'{supported}'" in message
    assert set(SUPPORTED_MODEL_TYPES) == {"vit", "deit"}


@pytest.mark.parametrize(
    "make_model",
    [
        pytest.param(lambda: ViTModel(tiny_vit_config()), id="ViTModel"),
        pytest.param(lambda: ViTForMaskedImageModeling(tiny_vit_config()), id="ViTForMaskedImageModeling"),
        pytest.param(lambda: torch.nn.Linear(2, 2), id="not-a-transformers-model"),
    ],
)
def test_vit_models_without_a_classifier_are_rejected(make_model):
    with pytest.raises(ValueError, match="ViTForImageClassification"):
        model_parts(make_model())
