"""hf_vit_compress: compress Hugging Face ViT/DeiT image classifiers under a FLOPs budget (OFB, UVC) and export
really smaller models that load with `trust_remote_code=True`."""

from .architecture import Architecture, LayerArchitecture
from .config import CompressionConfig, OFBConfig, UVCConfig
from .export import export_compressed_model, save_atomically
from .flops import count_macs, count_params
from .gating import apply_architecture
from .modeling import CompressedViTConfig, CompressedViTForImageClassification

__version__ = "0.1.0"


def __getattr__(name):
    # The trainer pulls in transformers.Trainer/accelerate: import it only when asked for.
    if name in ("CompressionTrainer", "CompressionCallback"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'hf_vit_compress' has no attribute {name!r}")


__all__ = [
    "Architecture",
    "CompressedViTConfig",
    "CompressedViTForImageClassification",
    "CompressionCallback",
    "CompressionConfig",
    "CompressionTrainer",
    "LayerArchitecture",
    "OFBConfig",
    "UVCConfig",
    "apply_architecture",
    "count_macs",
    "count_params",
    "export_compressed_model",
    "save_atomically",
    "__version__",
]
