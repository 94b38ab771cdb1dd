"""A/B of the scans (device): this tree's `ssd_fwd` against a baseline copy of `kernels/ssd.py` (e.g.
`git show HEAD~1:src/bsmamba2/kernels/ssd.py > base_ssd.py`), and the scans under variants of this tree's knobs, in
one process, alternating.

`kernel`  the scan alone at the paper's time axis (both directions: 2 × 496 sequences × 801 frames, 16 heads of
          64, d_state 128, x/B/C bf16 views of one conv output as the model passes them), for each variant of
          this tree's knobs (`--variants`, env settings such as BSMAMBA2_SSD_STAGES=2) against the baseline;
          each output is first checked against the baseline's float32 scan (relative error).
`band`    the fused band-axis call alone (2 × 6408 sequences × 62 bands, every fused option, views of one bf16
          in-projection), for each of `--band-variants` (env settings of this tree's knobs), each checked first
          against the same call in float32.
`model`   the paper-size model's inference (batch 8 × 8 s, bf16, timed as bench_gpu.py times it) with the baseline
          scan patched in (when --baseline is given), against this tree's (and this tree's under each of
          `--model-variants`, e.g. tritonband:BSMAMBA2_SSD_GLUON_BAND=0).
`backward` `ssd_bwd` alone at the training step's two axes (batch 5: time 2 × 310 sequences × 801 frames, band
          2 × 4005 × 62; x/B/C bf16 views of one conv output, dx/dB/dC views of one gradient, as the mixer's backward
          passes them) for each of `--bwd-variants` (env settings of this tree's knobs); each variant's six gradients
          are first checked against the float32 per-head kernel's (relative error, the largest of the six and which).

    PYTHONPATH=src python3 tools/ab_scan.py --baseline base_ssd.py kernel model --out ab_scan.json

What it decided: docs/perf-log.md (the scan rows).

    PYTHONPATH=src python3 tools/ab_scan.py band --band-variants default warps8:BSMAMBA2_SSD_WARPS_FWD_BAND=8
    PYTHONPATH=src python3 tools/ab_scan.py backward --bwd-variants grouped:BSMAMBA2_SSD_BWD_GROUPED=1 \
        perhead:BSMAMBA2_SSD_BWD_GROUPED=0 oneloop:BSMAMBA2_SSD_BWD_GROUPED=1,BSMAMBA2_SSD_BWD_SPLIT=0
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
from pathlib import Path

import torch
from scan_inputs import backward_buffers, band_inputs, scan_inputs  # tools/: the scan's inputs as the model has them

# The model and its inference timing exactly as the benchmarks measure them (benchmarks/common.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402


def load_baseline(path: str):
    if not Path(path).is_file():
        raise SystemExit(f"no baseline at {path}: save one with "
                         "`git show REV:src/bsmamba2/kernels/ssd.py > base_ssd.py`")
    spec = importlib.util.spec_from_file_location("bsmamba2_baseline_ssd", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def env(settings: dict[str, str]):
    old = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """'name:K=V,K=V' or 'name' (no settings)."""
    name, _, rest = text.partition(":")
    return name, dict(kv.split("=", 1) for kv in rest.split(",") if kv)


def bench_kernel(base, variants, seqs: int, length: int, rounds: int) -> dict:
    """Each variant's relative error against the baseline's float32 scan, then `rounds` alternating timings
    (rounds=0: the check alone, as the CPU test runs it)."""
    import triton.testing

    from bsmamba2.kernels import ssd

    x, dt, A, B, C, D = scan_inputs(seqs, length, device="cuda" if torch.cuda.is_available() else "cpu")
    ref = base.ssd_fwd(x.float(), dt, A, B.float(), C.float(), D, 2)
    calls = {"baseline": (base.ssd_fwd, {})} | {name: (ssd.ssd_fwd, s) for name, s in variants}
    result = {"shape": [2 * seqs, length, 16, 64, 128], "error_vs_baseline_fp32": {}, "ms": {n: [] for n in calls}}
    for name, (fn, settings) in calls.items():
        with env(settings):
            y = fn(x, dt, A, B, C, D, 2)
        result["error_vs_baseline_fp32"][name] = common.rel_error(y, ref)
    for _ in range(rounds):
        for name, (fn, settings) in calls.items():
            with env(settings):
                ms = triton.testing.do_bench(lambda: fn(x, dt, A, B, C, D, 2), warmup=50, rep=300,
                                             return_mode="median")
            result["ms"][name].append(ms)
    return result


def bench_band(variants, seqs: int, rounds: int) -> dict:
    """The fused band-axis call (`ssd_fwd` with every fused option, 2 × seqs sequences of 62 bands) for each
    variant of this tree's knobs: the relative error of g and Σg² against the same call on float32 copies of the
    inputs, then `rounds` alternating timings (rounds=0: the check alone, as the CPU test runs it)."""
    import triton.testing

    from bsmamba2.kernels import ssd

    x, dt, A, B, C, D, opt = band_inputs(seqs, device="cuda" if torch.cuda.is_available() else "cpu")
    f32 = dict(opt, z=opt["z"].float())

    def call(x, B, C, o):
        return ssd.ssd_fwd(x, dt, A, B, C, D, 2, **o)

    ref_g, ref_ss = call(x.float(), B.float(), C.float(), f32)
    result = {"shape": [*x.shape, B.shape[-1]], "error_vs_fp32": {}, "ms": {n: [] for n, _ in variants}}
    for name, settings in variants:
        with env(settings):
            g, ss = call(x, B, C, opt)
        result["error_vs_fp32"][name] = [common.rel_error(g, ref_g), common.rel_error(ss, ref_ss)]
    for _ in range(rounds):
        for name, settings in variants:
            with env(settings):
                ms = triton.testing.do_bench(lambda: call(x, B, C, opt), warmup=50, rep=300, return_mode="median")
            result["ms"][name].append(ms)
    return result


GRADIENTS = ("dx", "ddt", "dA", "dB", "dC", "dD")


def bench_backward(variants, axes: dict[str, tuple[int, int]], rounds: int) -> dict:
    """`ssd_bwd` (both directions in one call) for each variant of this tree's knobs on each axis (name → (sequences
    per direction, length)): the relative error of each of the six gradients against the float32 per-head kernel
    (BSMAMBA2_SSD_BWD_GROUPED=0 on float32 copies of x, B, C, dy), then `rounds` alternating timings (rounds=0: the
    check alone, as the CPU test runs it)."""
    import triton.testing

    from bsmamba2.kernels import ssd

    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {}
    for axis, (seqs, length) in axes.items():
        x, dt, A, B, C, D = scan_inputs(seqs, length, device=device)
        dy, dx, dB, dC = backward_buffers(x, B)

        def call():
            return ssd.ssd_bwd(dy, x, dt, A, B, C, D, 2, dx=dx, dB=dB, dC=dC)

        with env({"BSMAMBA2_SSD_BWD_GROUPED": "0"}):
            ref = ssd.ssd_bwd(dy.float(), x.float(), dt, A, B.float(), C.float(), D, 2)
        res = {"shape": [*x.shape, B.shape[-1]], "error_vs_fp32_per_head": {}, "ms": {n: [] for n, _ in variants}}
        for name, settings in variants:
            with env(settings):
                got = call()
            res["error_vs_fp32_per_head"][name] = {k: common.rel_error(a, b) for k, a, b in zip(GRADIENTS, got, ref)}
            del got
        del ref
        for _ in range(rounds):
            for name, settings in variants:
                with env(settings):
                    res["ms"][name].append(triton.testing.do_bench(call, warmup=25, rep=200, return_mode="median"))
        result[axis] = res
        del x, dt, B, C, dy, dx, dB, dC
    return result


def bench_model(base, rounds: int, iters: int, variants=()) -> dict:
    """Inference audio-s/s with the baseline scan patched in (when given), with this tree's, and with this tree's
    under each of `variants` (env settings), alternating."""
    from bsmamba2.kernels import block, ssd

    model = common.build("bsmamba2", device="cuda")
    samples = 8 * common.SR
    new_fwd = ssd.ssd_fwd
    runs = ([] if base is None else [("baseline", base.ssd_fwd, {})]) + [("this tree", new_fwd, {})] \
        + [(n, new_fwd, s) for n, s in variants]
    out = {name: [] for name, _, _ in runs}
    for _ in range(rounds):
        for name, fn, settings in runs:
            block.ssd_fwd = ssd.ssd_fwd = fn
            try:
                with env(settings):
                    out[name].append(common.time_inference(model, 8, samples, iters, 3)["audio_s_per_s"])
            finally:
                block.ssd_fwd = ssd.ssd_fwd = new_fwd
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="+", choices=["kernel", "band", "model", "backward"])
    ap.add_argument("--baseline", default=None,
                    help="a copy of kernels/ssd.py to compare against (kernel; model: optional)")
    ap.add_argument("--variants", nargs="*", default=["default", "stages2:BSMAMBA2_SSD_STAGES=2"],
                    help="name:KEY=VALUE,... (the kernels' environment knobs, e.g. BSMAMBA2_SSD_WARPS_FWD=8)")
    ap.add_argument("--band-variants", nargs="*", default=["default"],
                    help="variants of the `band` part, as --variants (e.g. warps8:BSMAMBA2_SSD_WARPS_FWD_BAND=8)")
    ap.add_argument("--model-variants", nargs="*", default=[],
                    help="variants of this tree in the `model` part, as --variants")
    ap.add_argument("--bwd-variants", nargs="*",
                    default=["grouped:BSMAMBA2_SSD_BWD_GROUPED=1", "perhead:BSMAMBA2_SSD_BWD_GROUPED=0",
                             "oneloop:BSMAMBA2_SSD_BWD_GROUPED=1,BSMAMBA2_SSD_BWD_SPLIT=0"],
                    help="variants of the `backward` part, as --variants (e.g. w4:BSMAMBA2_SSD_WARPS_BWD_GROUPED=4)")
    ap.add_argument("--bwd-axes", nargs="*", default=["time:310:801", "band:4005:62"],
                    help="axes of the `backward` part, name:sequences per direction:length (batch 5: 5 x 62 "
                         "sequences of 801 frames, 5 x 801 of 62 bands)")
    ap.add_argument("--band-seqs", type=int, default=6408, help="band-axis sequences per direction (8 x 801)")
    ap.add_argument("--seqs", type=int, default=496, help="sequences per direction (batch 8 x 62 bands)")
    ap.add_argument("--length", type=int, default=801)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if "kernel" in args.parts and args.baseline is None:
        ap.error("the kernel part compares against --baseline (a copy of kernels/ssd.py)")
    base = load_baseline(args.baseline) if args.baseline else None
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__}
    if "kernel" in args.parts:
        results["kernel"] = bench_kernel(base, [parse_variant(v) for v in args.variants], args.seqs, args.length,
                                         args.rounds)
    if "band" in args.parts:
        results["band"] = bench_band([parse_variant(v) for v in args.band_variants], args.band_seqs, args.rounds)
    if "model" in args.parts:
        results["model"] = bench_model(base, args.rounds, args.iters, [parse_variant(v) for v in args.model_variants])
    if "backward" in args.parts:
        axes = {name: (int(seqs), int(length)) for name, seqs, length in (a.split(":") for a in args.bwd_axes)}
        results["backward"] = bench_backward([parse_variant(v) for v in args.bwd_variants], axes, args.rounds)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    if "kernel" in results:
        k = results["kernel"]
        print(f"{'variant':<20} {'rel err vs base fp32':>22} {'ms per call (median of do_bench, per round)':>40}")
        for name, ms in k["ms"].items():
            times = " / ".join(f"{t:.3f}" for t in ms)
            print(f"{name:<20} {k['error_vs_baseline_fp32'][name]:>22.2e}   {times}")
    if "band" in results:
        k = results["band"]
        print(f"{'band variant':<20} {'rel err g, Σg² vs fp32':>26} {'ms per call (per round)':>30}")
        for name, ms in k["ms"].items():
            e = k["error_vs_fp32"][name]
            print(f"{name:<20} {e[0]:>12.2e} {e[1]:>12.2e}   " + " / ".join(f"{t:.3f}" for t in ms))
    if "backward" in results:
        for axis, k in results["backward"].items():
            print(f"backward {axis} {k['shape']}")
            print(f"{'variant':<20} {'largest rel err vs fp32 per-head':>34} {'ms per call (per round)':>28}")
            for name, ms in k["ms"].items():
                errors = k["error_vs_fp32_per_head"][name]
                worst = max(errors, key=errors.get)
                print(f"{name:<20} {errors[worst]:>26.2e} ({worst:<3})   " + " / ".join(f"{t:.3f}" for t in ms))
    if "model" in results:
        for name, v in results["model"].items():
            print(f"model {name:<12} audio-s/s " + " / ".join(f"{t:.1f}" for t in v)
                  + f"  (median {statistics.median(v):.1f})")


if __name__ == "__main__":
    main()
