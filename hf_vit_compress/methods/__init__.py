"""Compression methods: `base.CompressionMethod` (the interface), `registry` (name -> method: `register_method`;
`base.build_method` builds one), and one folder per method (`ofb/`, `uvc/`).

Kept free of imports at module level: `hf_vit_compress.config` imports the methods' settings and the registry, and
the methods import the config.
"""

_LAZY = {
    "CompressionMethod": "base",
    "build_method": "base",
    "register_method": "registry",
    "registered_methods": "registry",
    "unregister_method": "registry",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
