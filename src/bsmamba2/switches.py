"""Backend choice and every `BSMAMBA2_*` environment switch of the compute path, read in this one place.

A leaf module: it imports no other bsmamba2 module, so model code and `kernels/` alike may ask it.

| variable | default | effect |
|---|---|---|
| `BSMAMBA2_BACKEND` | `auto` | scan backend at import (`set_backend` changes it later): `torch`, `triton`, `auto` |
| `BSMAMBA2_CPU_COMPILE` | `auto` | default of `Separator(compile=)` / `--compile`: CPU inference through `torch.compile` (`cpu_compile.py`) |
| `BSMAMBA2_FUSED` | `1` | `0`: the fast block's fused inference path off (A/B runs) |
| `BSMAMBA2_SSD_BLOCK` | `64` | chunk length of the Triton scan |
| `BSMAMBA2_SSD_HEADS_FIRST` | `1` | `0`: sequence-major grid for the per-(sequence, head) scan kernels |
| `BSMAMBA2_SSD_WARPS_<K>` | tuned | warps of scan kernel K: `FWD`, `FWD_BAND`, `BWD`, `BWD_GROUPED`, `BWD_GROUPED_BAND`, `BWD_STATES` |
| `BSMAMBA2_SSD_STAGES` | `3` | software-pipelining stages of the scan kernels for 16-bit inputs |
| `BSMAMBA2_SSD_STAGES_BWD` | `1` | software-pipelining stages of the grouped backward chunk kernel's head loop (16-bit inputs) |
| `BSMAMBA2_SSD_BWD_GROUPED` | `band` | which axes' backward chunk kernel is the grouped one (one program per (sequence, chunk, group), dB/dC summed over the heads inside it) rather than the per-head one (per-head dB/dC buffers summed after it): `band`, `time`, `1` both, `0` neither |
| `BSMAMBA2_SSD_BWD_SPLIT` | `1` | `0`: the grouped backward chunk kernel in one head loop (the state-entering terms not in a second one) |
| `BSMAMBA2_SSD_GLUON` | `1` | `0`: no Gluon (sm_90) scan kernels, the Triton ones instead |
| `BSMAMBA2_SSD_GLUON_BAND` | `1` | `0`: no Gluon band-axis kernel (the time-axis one stays) |
| `BSMAMBA2_SSD_BAND_MAXNREG` | `168` | register cap of the Gluon band-axis kernel (`0`: none) |
| `BSMAMBA2_GP_<NAME>` | tuned | tile sizes and launch settings of `kernels.gated_proj` |
| `BSMAMBA2_CATALOG_TEST_KILL` | unset | tests only: `K` makes the catalog process holding the longest file SIGKILL itself mid-file once K files are done |

Paths and network (read where they are used, not here): `BSMAMBA2_CACHE` (download cache, `pretrained.py`),
`BSMAMBA2_MIRROR` (where the model registry's files are fetched from, `pretrained.py`),
`BSMAMBA2_OFFLINE` (no network), `BSMAMBA2_SHARED` (the test fixtures' folder, `tests/conftest.py`).
Not ours but read here too: `TRITON_INTERPRET` (Triton's CPU interpreter, used by the tests).

All but `BSMAMBA2_BACKEND` are read at each call, so a test or an A/B script may set them between calls.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton")
_backend = os.environ.get("BSMAMBA2_BACKEND", "auto")


def _flag(name: str, default: str = "1") -> bool:
    """An on/off switch: off when set to "" or "0"."""
    return os.environ.get(name, default) not in ("", "0")


def _int(name: str, default: int | str) -> int:
    return int(os.environ.get(name, default))


# --- backend -------------------------------------------------------------------------------------------------------

def set_backend(name: str) -> None:
    """Choose the scan implementation: "auto", "torch" or "triton"."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    """The backend setting ("auto", "torch" or "triton"); `resolve_backend` says what runs for a device."""
    return _backend


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (TRITON_INTERPRET=1)."""
    return _flag("TRITON_INTERPRET", "0")


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401, PLC0415
        import triton.language  # noqa: F401, PLC0415
    except Exception:  # ImportError, or a broken install raising anything at import
        return False
    return True


def triton_available() -> bool:
    """True when the Triton kernels can run: Triton importable and a CUDA device (or TRITON_INTERPRET=1)."""
    if not _triton_importable():
        return False
    return interpreting() or torch.cuda.is_available()


def resolve_backend(device: torch.device) -> str:
    """The backend that runs for tensors on `device` under the current setting: "torch" or "triton"."""
    if _backend == "torch":
        return "torch"
    if _backend == "triton":
        if device.type != "cuda" or not triton_available():
            raise RuntimeError("backend 'triton' needs a CUDA device and `pip install triton`; use 'torch' or 'auto'")
        return "triton"
    return "triton" if device.type == "cuda" and triton_available() else "torch"


# --- CPU inference ---------------------------------------------------------------------------------------------------

def cpu_compile() -> str:
    """BSMAMBA2_CPU_COMPILE: the default compile mode of CPU inference, "auto", "on" or "off" (`bsmamba2.cpu_compile`)."""
    return os.environ.get("BSMAMBA2_CPU_COMPILE", "auto")


# --- the fast block ------------------------------------------------------------------------------------------------

def fused_inference() -> bool:
    """BSMAMBA2_FUSED: the fast block's fused inference path (on unless "0")."""
    return os.environ.get("BSMAMBA2_FUSED", "1") != "0"


# --- the scan kernels ----------------------------------------------------------------------------------------------

def ssd_block() -> int:
    """BSMAMBA2_SSD_BLOCK: chunk length of the Triton scan (tuned: 64)."""
    return _int("BSMAMBA2_SSD_BLOCK", 64)


def ssd_heads_first() -> bool:
    """BSMAMBA2_SSD_HEADS_FIRST: heads-first grid order of the per-(sequence, head) scan kernels (on unless "0")."""
    return _flag("BSMAMBA2_SSD_HEADS_FIRST")


def ssd_warps(kernel: str, default: int) -> int:
    """BSMAMBA2_SSD_WARPS_<kernel>: warps per program of a scan kernel (FWD, FWD_BAND, BWD, BWD_GROUPED,
    BWD_GROUPED_BAND, BWD_STATES)."""
    return _int(f"BSMAMBA2_SSD_WARPS_{kernel}", default)


def ssd_stages() -> int:
    """BSMAMBA2_SSD_STAGES: software-pipelining stages of the scan kernels for 16-bit inputs (default 3)."""
    return _int("BSMAMBA2_SSD_STAGES", 3)


def ssd_bwd_stages() -> int:
    """BSMAMBA2_SSD_STAGES_BWD: software-pipelining stages of the grouped backward chunk kernel's head loop for
    16-bit inputs (default 1)."""
    return _int("BSMAMBA2_SSD_STAGES_BWD", 1)


def ssd_bwd_split() -> bool:
    """BSMAMBA2_SSD_BWD_SPLIT: the grouped backward chunk kernel takes the terms of the state entering a chunk in a
    second loop over the heads (on unless "0"; "0": one loop, which spills more)."""
    return _flag("BSMAMBA2_SSD_BWD_SPLIT")


def ssd_bwd_grouped(axis: str) -> bool:
    """BSMAMBA2_SSD_BWD_GROUPED: whether the scan backward's chunk kernel on `axis` ("time": several chunks, "band":
    one) is the grouped one, one program per (sequence, chunk, group) with dB and dC summed over the group's heads
    inside it: "band" (default) or "time" that axis only, "1" both axes, "0" neither (per (sequence, chunk, head),
    per-head dB and dC buffers summed after it). On an H100 at the training step's shapes the grouped kernel takes
    5.1 against 7.1 ms per band-axis call but 15.9 against 13.4 ms per time-axis call (docs/perf-log.md, row 102)."""
    value = os.environ.get("BSMAMBA2_SSD_BWD_GROUPED", "band")
    return value == axis or value not in ("", "0", "time", "band")


def ssd_gluon() -> bool:
    """BSMAMBA2_SSD_GLUON: the Gluon (sm_90) scan kernels where they apply (on unless "0")."""
    return _flag("BSMAMBA2_SSD_GLUON")


def ssd_gluon_band() -> bool:
    """BSMAMBA2_SSD_GLUON_BAND: the Gluon band-axis kernel where it applies (on unless "0"; needs `ssd_gluon`)."""
    return _flag("BSMAMBA2_SSD_GLUON_BAND")


def ssd_band_maxnreg(default: int) -> int:
    """BSMAMBA2_SSD_BAND_MAXNREG: register cap of the Gluon band-axis kernel (0 or empty: none)."""
    return int(os.environ.get("BSMAMBA2_SSD_BAND_MAXNREG", default) or 0)


# --- the gated out-projection --------------------------------------------------------------------------------------

def gated_proj_setting(name: str, default: int) -> int:
    """BSMAMBA2_GP_<name>: a tile size or launch setting of `kernels.gated_proj` (for measurement)."""
    return _int(f"BSMAMBA2_GP_{name}", default)


# --- test hooks ---------------------------------------------------------------------------------------------------

CATALOG_TEST_KILL = "BSMAMBA2_CATALOG_TEST_KILL"


def catalog_test_kill() -> str | None:
    """BSMAMBA2_CATALOG_TEST_KILL: the catalog's crash test hook (`catalog._TestKill`), or None when unset."""
    return os.environ.get(CATALOG_TEST_KILL)
