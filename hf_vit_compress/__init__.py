"""hf_vit_compress: compress Hugging Face ViT/DeiT image classifiers under a FLOPs budget (OFB, UVC) and export
really smaller models that load with `trust_remote_code=True`."""

from .config import CompressionConfig, OFBConfig, UVCConfig
from .modeling import CompressedViTConfig, CompressedViTForImageClassification
from .publishing.saving import save_atomically
from .surgery.architecture import Architecture, LayerArchitecture
from .surgery.export import export_compressed_model
from .surgery.flops import count_macs, count_params
from .surgery.gating import apply_architecture

__version__ = "0.1.0"


#: imported only when asked for (the trainer pulls in transformers.Trainer/accelerate, the others the Hub client)
_LAZY = {
    "CompressionTrainer": "training.trainer",
    "CompressionCallback": "training.trainer",
    "compute_metrics": "publishing.metrics",
    "ImageClassificationMetrics": "publishing.metrics",
    "push_compressed_folder": "publishing.publish",
    "save_compressed_model": "publishing.publish",
    "build_model_card": "publishing.card",
    "export_onnx": "publishing.onnx_export",
    "verify_compressed_folder": "publishing.verify",
    "load_compressed_model": "publishing.verify",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hf_vit_compress' has no attribute {name!r}")


__all__ = [
    "Architecture",
    "CompressedViTConfig",
    "CompressedViTForImageClassification",
    "CompressionCallback",
    "CompressionConfig",
    "CompressionTrainer",
    "ImageClassificationMetrics",
    "LayerArchitecture",
    "OFBConfig",
    "UVCConfig",
    "apply_architecture",
    "build_model_card",
    "compute_metrics",
    "count_macs",
    "count_params",
    "export_compressed_model",
    "export_onnx",
    "load_compressed_model",
    "push_compressed_folder",
    "save_atomically",
    "save_compressed_model",
    "verify_compressed_folder",
    "__version__",
]
