"""The method registry: `CompressionConfig.method` names a registered method, `base.build_method` builds it.

A method is one folder under `methods/` (its config, modules and `CompressionMethod` subclass) plus one
`register_method` line, here for the built-in ones or in the user's own code for others (as peft's
`register_peft_method`). Entries name their class as `"module:Class"` so that the registry, which
`hf_vit_compress.config` imports, imports nothing of the package (and no torch) until a method is built.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MethodEntry:
    """One registered method.

    Args:
        name: the value of `CompressionConfig.method` that selects it.
        method_class: the `CompressionMethod` subclass, or `"package.module:ClassName"` imported when first built.
        title: the paper's title (model cards cite it); empty for a method without one.
        venue: where it was published (e.g. `"ICLR 2022"`).
        url: a link to the paper.
        prunes: one line on what the method removes (model cards show it).
        plot_file: the file name of its search plot in a saved run (`publishing.report`), or None.
    """

    name: str
    method_class: Any
    title: str = ""
    venue: str = ""
    url: str = ""
    prunes: str = ""
    plot_file: str | None = None

    def load_class(self) -> type:
        if not isinstance(self.method_class, str):
            return self.method_class
        module, _, attribute = self.method_class.partition(":")
        return getattr(importlib.import_module(module), attribute)


_REGISTRY: dict[str, MethodEntry] = {}


def register_method(name: str, method_class: Any, **facts: Any) -> MethodEntry:
    """Register (or replace) a compression method under `name`; `facts` are `MethodEntry`'s other fields."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_method: name={name!r} is invalid: allowed a Python identifier such as 'ofb'")
    entry = MethodEntry(name, method_class, **facts)
    _REGISTRY[name] = entry
    return entry


def unregister_method(name: str) -> None:
    """Remove a registered method (a test's or plug-in's own); unknown names are a `KeyError`."""
    del _REGISTRY[name]


def registered_methods() -> tuple[str, ...]:
    """The names `CompressionConfig.method` accepts, in registration order."""
    return tuple(_REGISTRY)


def method_entry(name: str) -> MethodEntry:
    if name not in _REGISTRY:
        raise ValueError(f"CompressionConfig.method={name!r} is not registered; allowed: {list(_REGISTRY)}")
    return _REGISTRY[name]


# -- the built-in methods: one line each ----------------------------------------------------------------------
register_method(
    "ofb", "hf_vit_compress.methods.ofb.method:OFBMethod",
    title="Once for Both: Single Stage of Importance and Sparsity Search for Vision Transformer Compression",
    venue="CVPR 2024", url="https://arxiv.org/abs/2403.15835",
    prunes="Heads, q/k/v head dimensions, MLP widths and the residual width", plot_file="bimask_evolution.png",
)
register_method(
    "uvc", "hf_vit_compress.methods.uvc.method:UVCMethod",
    title="Unified Visual Transformer Compression", venue="ICLR 2022", url="https://arxiv.org/abs/2203.08243",
    prunes="Heads, value head dimensions, MLP widths and whole blocks", plot_file="search_evolution.png",
)

__all__ = ["MethodEntry", "method_entry", "register_method", "registered_methods",
           "unregister_method"]
