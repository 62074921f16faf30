"""hf_vit_compress: compress Hugging Face ViT/DeiT image classifiers under a FLOPs budget (OFB, UVC) and export
really smaller models that load with `trust_remote_code=True`."""

from .architecture import Architecture, LayerArchitecture
from .config import CompressionConfig, OFBConfig, UVCConfig
from .export import export_compressed_model, save_atomically
from .flops import count_macs, count_params
from .gating import apply_architecture
from .modeling import CompressedViTConfig, CompressedViTForImageClassification

__version__ = "0.1.0"


#: imported only when asked for (the trainer pulls in transformers.Trainer/accelerate, the others the Hub client)
_LAZY = {
    "CompressionTrainer": "trainer",
    "CompressionCallback": "trainer",
    "compute_metrics": "metrics",
    "ImageClassificationMetrics": "metrics",
    "push_compressed_folder": "publish",
    "save_compressed_model": "publish",
    "build_model_card": "card",
    "export_onnx": "onnx_export",
    "verify_compressed_folder": "verify",
    "load_compressed_model": "verify",
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
