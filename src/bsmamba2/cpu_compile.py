"""CPU inference through `torch.compile` (Inductor's C++ backend): the plain bidirectional block, compiled.

On a CPU the plain block (`mamba2.BiMamba2Block._plain`) spends about as long in its elementwise work (the scan's
decays, SiLU, the norms, layout copies) as in its matrix products. Inductor fuses that work into a few vectorized C++
loops. One compiled function serves every block of a model (the weights are inputs of the graph, not constants),
once per input shape; compiling costs tens of seconds on a small CPU (cached on disk by Inductor afterwards), so it
pays on long inputs only:

    mode "off"   never
    mode "on"    always (on the CPU)
    mode "auto"  (default) on the CPU for inputs of at least `AUTO_MIN_SECONDS`, when a C++ compiler is found

The compiled block computes the same function as the eager one (to float rounding; tests/test_cpu_compile.py). If
compiling fails (no working compiler, an unsupported platform), a warning says so once and the eager block runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from typing import Iterator

import torch
from torch import Tensor

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
AUTO_MIN_SECONDS = 60.0  # shorter inputs run eagerly under "auto": compiling would cost more than it saves

_state = threading.local()  # .active: compile the blocks run by this thread now
_compiled = None  # the compiled block function, made on first use and shared by all blocks
_failed = False  # compiling failed once: eager from then on


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {MODES}")
    return mode


def compiler_found() -> bool:
    """Whether a C++ compiler for Inductor is on the PATH ($CXX, else g++, clang++ or MSVC's cl)."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "cl"]
    return any(shutil.which(name) for name in names)


def wanted(mode: str, device: torch.device, seconds: float | None) -> bool:
    """Whether to compile the blocks for `seconds` of input on `device` under `mode` (None: length unknown)."""
    if check_mode(mode) == "off" or device.type != "cpu":
        return False
    if mode == "on":
        return True
    return seconds is not None and seconds >= AUTO_MIN_SECONDS and compiler_found()


@contextlib.contextmanager
def enabled(active: bool = True) -> Iterator[None]:
    """Within the block, CPU inference of bidirectional blocks in this thread runs compiled (when `active`)."""
    before = getattr(_state, "active", False)
    _state.active = active
    try:
        yield
    finally:
        _state.active = before


def active() -> bool:
    return getattr(_state, "active", False) and not _failed


def _plain_block(block, x: Tensor) -> Tensor:
    return block._plain(x)


def run_block(block, x: Tensor) -> Tensor:
    """`block._plain(x)` compiled (eager when compiling fails; later calls then stay eager)."""
    global _compiled, _failed
    if not _failed:
        try:
            if _compiled is None:
                log.info("CPU inference through torch.compile: the first segment also compiles the model (tens of "
                         "seconds once, cached on disk); --compile off skips it")
                _compiled = torch.compile(_plain_block, dynamic=False)
            return _compiled(block, x)
        except Exception as err:  # no compiler, or Inductor cannot build here: the eager block is the same function
            _failed = True
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            log.warning("torch.compile failed on this machine (%s); running uncompiled (slower). "
                        "Pass --compile off to skip the attempt.", first)
    return block._plain(x)
