"""Device and precision choices shared by inference commands: `auto|cpu|cuda|cuda:N|mps` and `fp32|bf16|fp16`."""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
import time

import torch

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """Turn a user's device name into a `torch.device`; `auto` picks CUDA, then Apple MPS, then CPU.

    Raises ValueError with what is available when the requested device cannot be used.
    """
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise ValueError("device 'mps' requested but Apple MPS is not available here; use --device cpu or auto")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but this PyTorch sees no CUDA GPU; use --device cpu or auto")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"bad device {name!r}; write cuda or cuda:N") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist "
                f"(cuda:0…cuda:{torch.cuda.device_count() - 1})"
            )
        return device
    raise ValueError(f"unknown device {name!r}; choose auto, cpu, cuda, cuda:N or mps")


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup() -> float:
    """How many times faster this CPU multiplies bfloat16 matrices than float32 ones, at the shape of a small
    model's projections ((2048 × 256) · (256 × 768), best of 3 each; a few ms in all, once per process). Well above
    1 where the CPU has bf16 units (x86 AVX512-BF16 or AMX, Arm BF16); below 1 where bf16 is emulated."""
    a, b = torch.randn(2048, 256), torch.randn(256, 768)
    ab, bb = a.to(torch.bfloat16), b.to(torch.bfloat16)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        x @ y  # warm-up: oneDNN picks and caches its kernel on the first call
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(a, b) / max(best(ab, bb), 1e-9)


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags on Linux (the `flags` line of /proc/cpuinfo), None where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def cpu_bf16_native(threshold: float = 1.5) -> bool:
    """Whether bf16 projections pay on this CPU: the CPU's default precision. On Linux x86 the CPU's flags decide
    (AVX512-BF16 or AMX-BF16, what oneDNN's bf16 products run on), so every process of a job decides alike; elsewhere
    a timing (`cpu_bf16_speedup() >= threshold`)."""
    flags = cpu_flags()
    if flags is not None and platform.machine().lower() in ("x86_64", "amd64"):
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    return cpu_bf16_speedup() >= threshold


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_precision(precision: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`None`/fp32 → float32; bf16/fp16 run the model under autocast on a GPU (`Separator` runs a CPU's bf16 as bf16
    projections instead). fp16 needs a GPU."""
    if precision is None:
        return torch.float32
    if isinstance(precision, torch.dtype):
        dtype = precision
    else:
        key = str(precision).lower().replace("float", "fp").replace("bfloat16", "bf16")
        key = {"fp16": "fp16", "half": "fp16", "bf16": "bf16", "fp32": "fp32", "full": "fp32"}.get(key, key)
        if key not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {sorted(PRECISIONS)}")
        dtype = PRECISIONS[key]
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("fp16 needs a GPU; on a CPU use --precision bf16 or fp32, or leave it out (bf16 projections "
                         "where the CPU has bf16 units, else fp32)")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast context for `dtype` on `device`, or a no-op for float32 (the model keeps its FFTs and scans in fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
