"""GPU kernels (Triton) for the fast path of `bsmamba2.mamba2`; each has a plain-PyTorch twin in `bsmamba2.ssd`.

`available()` says whether they can run here: Triton importable and a CUDA device, or Triton's CPU interpreter
(TRITON_INTERPRET=1, used by the tests). The entry points import Triton lazily, so `import bsmamba2.kernels` never
fails on a machine without it.
"""

from __future__ import annotations

import functools
import os
from typing import Any

__all__ = ["available", "ssd_scan", "ssd_scan_bidirectional", "bimamba2_block_forward"]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401, PLC0415
        import triton.language  # noqa: F401, PLC0415
    except Exception:  # ImportError, or a broken install raising anything at import
        return False
    return True


def available() -> bool:
    """True when the Triton kernels can run: Triton importable and a CUDA device (or TRITON_INTERPRET=1)."""
    if not _triton_importable():
        return False
    if interpreting():
        return True
    import torch  # noqa: PLC0415

    return torch.cuda.is_available()


def ssd_scan(*args: Any, **kwargs: Any):
    """See `bsmamba2.kernels.ssd.ssd_scan`."""
    from bsmamba2.kernels.ssd import ssd_scan as fn  # noqa: PLC0415

    return fn(*args, **kwargs)


def ssd_scan_bidirectional(*args: Any, **kwargs: Any):
    """See `bsmamba2.kernels.ssd.ssd_scan_bidirectional`."""
    from bsmamba2.kernels.ssd import ssd_scan_bidirectional as fn  # noqa: PLC0415

    return fn(*args, **kwargs)


def bimamba2_block_forward(*args: Any, **kwargs: Any):
    """See `bsmamba2.kernels.block.bimamba2_block_forward`."""
    from bsmamba2.kernels.block import bimamba2_block_forward as fn  # noqa: PLC0415

    return fn(*args, **kwargs)
