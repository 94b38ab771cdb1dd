"""A scan kernel compiled for the H100/H200 (sm_90a) on any machine, no GPU needed: registers, stack
(spills), shared memory, and what one pass of its main loop (chunks; heads for `--kernel band` and the grouped
backward) issues (SASS instructions, barriers, warp shuffles, async copies, plain global loads, tensor-core
instructions, exponentials, local-memory accesses; a kernel without a loop, the per-head backward, is counted whole).

Kernels: the time-axis forward (`triton`, `gluon`), the fused band-axis forward (`band`), and the backward's chunk
kernel on the time axis (`bwd`) or the band axis (`bwd-band`): the per-head one, or with BSMAMBA2_SSD_BWD_GROUPED=1
the grouped one; BSMAMBA2_SSD_WARPS_BWD_GROUPED(_BAND), BSMAMBA2_SSD_STAGES_BWD and BSMAMBA2_SSD_BWD_SPLIT apply
as at a launch.

The kernel is compiled as the real launch specializes it: `ssd_fwd` (`ssd_bwd`) is called on CPU tensors laid out as
the model lays them out (x, B, C views of one conv output, 801 frames or 62 bands; the backward's dx, dB, dC views of
one gradient) with the launch captured instead of run, and each argument is specialized as Triton's JIT does on the GPU (an integer equal to 1 becomes a constant, integers and
pointers divisible by 16 are marked so). Registers and stack come from the cubin Triton builds, read by the
`cuobjdump` it ships; the loop from its `nvdisasm`. Numbers depend on the Triton version, which is printed with
them: the device has 3.6 (`pip install --target DIR triton==3.6.0`, then PYTHONPATH=DIR:src).

    PYTHONPATH=src python3 tools/sm90_loop_stats.py [--kernel triton|gluon|band|bwd|bwd-band] [--stages 3] [--keep DIR]

What its numbers decided: docs/perf-log.md (the sm_90 scan rows)."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bsmamba2.kernels import ssd, ssd_backward, ssd_time, ssd_time_sm90

# tools/: the scan's inputs laid out as the model lays them out
from scan_inputs import backward_buffers, band_inputs, scan_inputs

DTYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


class _Capture:
    """Stands in for a JIT kernel: `kernel[grid](*args, **kwargs)` records the call instead of launching it."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def captured_launch(seqs: int = 2, length: int = 801, kernel: str = "triton"):
    """(kernel, args, kwargs) of the time-axis forward launch for the model's layout (paper size: 16 heads of 64,
    d_state 128, bf16): `ssd_fwd`'s Triton kernel, or (kernel="gluon") `ssd_time_sm90`'s; kernel="band": the fused
    band-axis launch of `ssd_band_sm90` (62 bands), whose loop is the head loop."""
    cap = _Capture()
    if kernel in ("band", "gluon"):
        from bsmamba2.kernels import ssd_band_sm90  # noqa: PLC0415

        module = ssd_band_sm90 if kernel == "band" else ssd_time_sm90
        real = module._build()
        # the launch recorded, and the Triton pre-pass (which cannot run without a GPU) by its PyTorch twin
        with mock.patch.object(module, "_kernel", lambda: cap), \
                mock.patch.object(module, "chunk_steps", ssd_time_sm90.chunk_steps_reference):
            if kernel == "band":
                x, dt, A, B, C, D, o = band_inputs(seqs, device="cpu")
                y, ss = torch.empty_like(x), torch.empty(x.shape[:-1])
                ssd_band_sm90.band_fwd_sm90(x, dt, A.float().contiguous(), B, C, D.float().contiguous(), 2,
                                            o["x_conv"], o["bc_conv"], o["dt_bias"], o["z"], y, ss)
            else:
                x, dt, A, B, C, D = scan_inputs(seqs, length, device="cpu")
                ssd_time_sm90.time_fwd_sm90(x, dt, A.float().contiguous(), B, C, D.float().contiguous(), dir_mode=2)
    elif kernel in ("bwd", "bwd-band"):
        x, dt, A, B, C, D = scan_inputs(seqs, 62 if kernel == "bwd-band" else length, device="cpu")
        dy, dx, dB, dC = backward_buffers(x, B)
        grouped = ssd._bwd_grouped(kernel == "bwd")
        real = ssd_backward.bwd_chunk_grouped_kernel if grouped else ssd_backward.bwd_chunk_kernel
        with mock.patch.object(ssd_backward, "bwd_states_kernel", _Capture()), \
                mock.patch.object(ssd_backward, "bwd_chunk_grouped_kernel" if grouped else "bwd_chunk_kernel", cap):
            ssd.ssd_bwd(dy, x, dt, A, B, C, D, dir_mode=2, dx=dx, dB=dB, dC=dC)
    else:
        x, dt, A, B, C, D = scan_inputs(seqs, length, device="cpu")
        real = ssd_time.time_fwd_kernel
        with mock.patch.object(ssd_time, "time_fwd_kernel", cap):
            ssd.ssd_fwd(x, dt, A, B, C, D, dir_mode=2)
    if len(cap.calls) != 1:
        raise RuntimeError(f"expected one launch of the {kernel} scan kernel, saw {len(cap.calls)}")
    _, args, kwargs = cap.calls[0]
    return real, args, kwargs


def specialize(kernel, args, kwargs):
    """(signature, constexprs, attrs, options) of the launch, specialized as the JIT specializes it on the GPU:
    the arguments of `triton.compiler.ASTSource` keyed by argument index, and num_warps / num_stages."""
    names = kernel.arg_names
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    signature, constexprs, attrs = {}, {}, {}
    values = dict(zip(names, args)) | kwargs | options  # a Gluon kernel takes num_warps as a constexpr argument
    fn = getattr(kernel, "fn", kernel)  # a JIT function, or the interpreter's wrapper when a test turned it on
    constexpr = {n for n, p in inspect.signature(fn).parameters.items() if "constexpr" in str(p.annotation)}
    for i, name in enumerate(names):
        v = values[name]
        key = (i,)
        if name in kwargs or name in options or name in constexpr:  # a constexpr parameter, by keyword or not
            signature[name], constexprs[key] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[name] = DTYPES[v.dtype]
            if (v.data_ptr() % 16) == 0:
                attrs[key] = [["tt.divisibility", 16]]
        elif isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"argument {name} of type {type(v).__name__}: not handled")
        elif v == 1:
            signature[name], constexprs[key] = "constexpr", 1
        else:
            signature[name] = "i32" if abs(v) < 2**31 else "i64"
            if v % 16 == 0:
                attrs[key] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs, options


def _tool(name: str) -> str:
    import triton.backends.nvidia as nv
    path = Path(nv.__file__).parent / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: this Triton package ships no {name}")
    return str(path)


def loop_stats(sass: str, whole: bool = False) -> dict:
    """Counts over the longest backward branch's body (the chunk loop; the grouped backward's first head loop) of
    an nvdisasm listing; whole=True: over every instruction when there is no loop (ValueError otherwise)."""
    label_addr, instrs, pending = {}, [], []
    for line in sass.splitlines():
        m = re.match(r"\s*\.(L_x_\d+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(.*)", line)
        if m:
            addr = int(m.group(1), 16)
            label_addr.update((p, addr) for p in pending)
            pending = []
            instrs.append((addr, m.group(2)))
    loop = None
    for addr, text in instrs:
        m = re.search(r"BRA\s+`?\(\.(L_x_\d+)\)", text)
        if m and label_addr.get(m.group(1), addr) < addr:
            span = (label_addr[m.group(1)], addr)
            if loop is None or span[1] - span[0] > loop[1] - loop[0]:
                loop = span
    if loop is None and not whole:
        raise ValueError("no loop found in the listing")
    body = [t for a, t in instrs if loop is None or loop[0] <= a <= loop[1]]

    def count(pattern: str) -> int:
        return sum(bool(re.search(pattern, t)) for t in body)

    return {"loop": loop is not None, "loop_instructions": len(body), "barriers": count(r"\bBAR\.SYNC"),
            "shuffles": count(r"\bSHFL\."),
            "async_copies": count(r"\bLDGSTS"), "plain_global_loads": count(r"\bLDG\."),
            "tensor_core": count(r"\bHGMMA\."), "exp2": count(r"MUFU\.EX2"),
            "local_memory": count(r"\b(STL|LDL)\b")}


def compile_stats(stages: int | None = None, warps: int | None = None, keep: str | None = None,
                  kernel_name: str = "triton") -> dict:
    kernel, args, kwargs = captured_launch(kernel=kernel_name)
    if stages is not None:
        kwargs["num_stages"] = stages
    if warps is not None:
        kwargs["num_warps"] = warps
    signature, constexprs, attrs, options = specialize(kernel, args, dict(kwargs))
    if kernel_name in ("gluon", "band"):
        from triton.experimental.gluon._runtime import GluonASTSource

        src = GluonASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    else:
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(keep or tmp)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kernel.ptx").write_text(compiled.asm["ptx"])
        (out / "kernel.ttgir").write_text(compiled.asm["ttgir"])
        (out / "kernel.cubin").write_bytes(compiled.asm["cubin"])  # as Triton built it
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(out / "kernel.cubin")],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", str(out / "kernel.cubin")], capture_output=True, text=True,
                              check=True).stdout
        (out / "kernel.sass").write_text(sass)
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return {"kernel": kernel_name, "triton": triton.__version__, "block_q": kwargs.get("BLOCK_Q", kwargs.get("Q")),
            "num_warps": options.get("num_warps"),
            "num_stages": options.get("num_stages"), "shared_bytes": compiled.metadata.shared,
            "registers": int(regs.group(1)) if regs else None,
            "stack_bytes": int(stack.group(1)) if stack else None,  # > 0: spills (the kernels hold no local arrays)
            "local_memory_total": len(re.findall(r"\b(?:STL|LDL)\b", sass)),  # in the whole kernel, loops or not
            **loop_stats(sass, whole=kernel_name.startswith("bwd"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, default=None, help="num_stages (default: the launch's)")
    ap.add_argument("--warps", type=int, default=None, help="num_warps (default: the launch's)")
    ap.add_argument("--keep", default=None, help="write the PTX, TTGIR and SASS to this folder")
    ap.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    ap.add_argument("--kernel", choices=["triton", "gluon", "band", "bwd", "bwd-band"], default="triton",
                    help="the time-axis Triton kernel (`ssd_time.time_fwd_kernel`), its Hopper twin in Gluon (`ssd_time_sm90`), "
                         "the fused band-axis Gluon kernel (`ssd_band_sm90`), or the backward's chunk kernel "
                         "(`ssd_backward`, per head unless BSMAMBA2_SSD_BWD_GROUPED=1) on the time or band axis")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("TRITON_INTERPRET is set: the interpreter compiles nothing; unset it to compile for sm_90a")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    stats = compile_stats(args.stages, args.warps, args.keep, args.kernel)
    if args.json:
        print(json.dumps(stats))
        return
    for key, value in stats.items():
        print(f"{key:<20} {value}")


if __name__ == "__main__":
    main()
