"""BSMamba2: band-split bidirectional Mamba2 for vocal separation (Kim & Choi, arXiv 2508.14556)."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"


class MissingExtra(ModuleNotFoundError):
    """An optional package (an extra such as `bsmamba2[onnx]`) is not installed; the message says what to install."""

# Public names, imported lazily so that `import bsmamba2` stays fast and light.
_EXPORTS = {
    "BSMamba2": "bsmamba2.model",
    "BSRoFormer": "bsmamba2.roformer",
    "build_model": "bsmamba2.build",
    "BSMamba2Config": "bsmamba2.config",
    "RoFormerConfig": "bsmamba2.config",
    "load_model": "bsmamba2.pretrained",  # names (bsmamba2-musdb, demo), paths, URLs, hf:// ids
    "save_model": "bsmamba2.checkpoint",
    "Separator": "bsmamba2.separate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bsmamba2' has no attribute {name!r}")
