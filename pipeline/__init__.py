"""Batch captioning and visual question answering of videos and images with LLaVA models on Ray.

The public API (pipeline/batch/caption.py): `pipeline.caption(ds, pipeline.CaptionConfig(...))` turns
a Ray Data Dataset of manifest-like rows into a lazy Dataset of output rows.

Importing this package is cheap: torch, transformers, av and ray are imported inside the functions
and actors that use them; the names below are loaded on first use (PEP 562).
"""

__all__ = ["CaptionConfig", "GenerationConfig", "StorageConfig", "caption"]

_LAZY = {"caption": "pipeline.batch.caption", "CaptionConfig": "pipeline.config", "GenerationConfig": "pipeline.config",
         "StorageConfig": "pipeline.config"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
