"""GPU kernels (Triton, and Gluon for Hopper) for the fast path of `bsmamba2.mamba2`.

Everything here takes and returns tensors (weights included) and imports no model code: only `bsmamba2.switches`
(backend and environment switches) and `bsmamba2.functional` (the plain helpers some twins use). Each kernel has a
plain-PyTorch twin, in `bsmamba2.ssd` (the scan), `bsmamba2.mamba2` (the norms, the block), `bsmamba2.functional` or
beside it (`*_reference`); `docs/architecture.md` lists them.

`available()` says whether they can run here: Triton importable and a CUDA device, or Triton's CPU interpreter
(TRITON_INTERPRET=1, used by the tests). The entry points import Triton lazily, so `import bsmamba2.kernels` never
fails on a machine without it.
"""

from __future__ import annotations

from typing import Any

from bsmamba2.switches import interpreting
from bsmamba2.switches import triton_available as available

__all__ = ["available", "interpreting", "ssd_scan", "ssd_scan_bidirectional"]


def ssd_scan(*args: Any, **kwargs: Any):
    """See `bsmamba2.kernels.ssd.ssd_scan`."""
    from bsmamba2.kernels.ssd import ssd_scan as fn  # noqa: PLC0415

    return fn(*args, **kwargs)


def ssd_scan_bidirectional(*args: Any, **kwargs: Any):
    """See `bsmamba2.kernels.ssd.ssd_scan_bidirectional`."""
    from bsmamba2.kernels.ssd import ssd_scan_bidirectional as fn  # noqa: PLC0415

    return fn(*args, **kwargs)
