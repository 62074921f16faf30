"""The compressed-model format: `CompressedViTConfig` and `CompressedViTForImageClassification`.

Importing this package registers both with the Auto classes; `save_pretrained` writes the two modeling files and
an `auto_map`, so the saved folder loads with `trust_remote_code=True` where this package is not installed.
"""

from transformers import AutoConfig, AutoModelForImageClassification

from .configuration_compressed_vit import CompressedViTConfig
from .modeling_compressed_vit import (
    CompressedViTForImageClassification,
    CompressedViTImageClassifierOutput,
    CompressedViTModel,
)

AutoConfig.register(CompressedViTConfig.model_type, CompressedViTConfig, exist_ok=True)
AutoModelForImageClassification.register(CompressedViTConfig, CompressedViTForImageClassification, exist_ok=True)
# Writes auto_map + copies the modeling files on save_pretrained / push_to_hub.
CompressedViTConfig.register_for_auto_class()
CompressedViTForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "CompressedViTConfig",
    "CompressedViTForImageClassification",
    "CompressedViTImageClassifierOutput",
    "CompressedViTModel",
]
