"""hf_vit_compress: compress Hugging Face ViT/DeiT image classifiers under a FLOPs budget."""

from .modeling import CompressedViTConfig, CompressedViTForImageClassification

__version__ = "0.1.0"

__all__ = ["CompressedViTConfig", "CompressedViTForImageClassification", "__version__"]
