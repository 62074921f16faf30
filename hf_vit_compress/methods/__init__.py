"""Compression methods. Each is a `CompressionMethod` (see base.py); `build_method` picks one by name."""

from __future__ import annotations

from torch import nn

from ..config import CompressionConfig
from .base import CompressionMethod


def build_method(model: nn.Module, config: CompressionConfig) -> CompressionMethod:
    """Instantiate the method named by `config.method` for `model` (the config is validated again first: a list
    field may have been changed in place)."""
    config.validate()
    if config.method == "ofb":
        from .ofb import OFBMethod

        return OFBMethod(model, config)
    if config.method == "uvc":
        from .uvc import UVCMethod

        return UVCMethod(model, config)
    raise ValueError(f"CompressionConfig.method={config.method!r} is not implemented; allowed: 'ofb', 'uvc'")


__all__ = ["CompressionMethod", "build_method"]
