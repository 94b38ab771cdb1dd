"""GPU benchmark: BSMamba2 (plain-PyTorch and fast backends) against BS-RoFormer, bf16 autocast, 8-s stereo chunks.

For each (model, backend) it measures, in one process:
    inference  audio-seconds per second at --batch (forward_waveform, STFT and iSTFT included), median of --iters
    training   seconds per step at --train-batch (forward + L1 loss + backward + AdamW), median of --steps,
               and the peak GPU memory of the step
    error      relative error ‖out − ref‖/‖ref‖ of the bf16-autocast output against the plain float32 path, on the
               same weights and input (BSMamba2 only; the reference runs at batch 1 to keep its memory small)

Prints a table and writes JSON to --out (default $OUT/bench_gpu.json when $OUT is set).

    PYTHONPATH=src python3 benchmarks/bench_gpu.py                      # everything, paper-size models
    PYTHONPATH=src python3 benchmarks/bench_gpu.py --runs mamba:triton --profile
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch

from bsmamba2 import mamba2
from bsmamba2.config import BSMamba2Config, RoFormerConfig
from bsmamba2.build import build_model

SR = 44100


def _sync() -> None:
    torch.cuda.synchronize()


def _time_cuda(fn, iters: int, warmup: int) -> list[float]:
    """Seconds per call of `fn`, timed with CUDA events, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _make(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = BSMamba2Config() if arch == "mamba" else RoFormerConfig()
    return build_model(cfg).cuda()


def bench_inference(model, batch: int, samples: int, iters: int, warmup: int) -> dict:
    model.eval()
    wave = torch.randn(batch, 2, samples, device="cuda") * 0.1

    def step():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model.forward_waveform(wave)

    torch.cuda.reset_peak_memory_stats()
    times = _time_cuda(step, iters, warmup)
    med = statistics.median(times)
    return {"infer_s_per_batch": med, "infer_s_all": times, "audio_s_per_s": batch * samples / SR / med,
            "infer_peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def bench_training(model, batch: int, samples: int, steps: int, warmup: int, checkpointing: bool) -> dict:
    model.train()
    model.activation_checkpointing = checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    wave = torch.randn(batch, 2, samples, device="cuda") * 0.1
    target = torch.randn(batch, 1, 2, samples, device="cuda") * 0.05

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.forward_waveform(wave)
        loss = (out.float() - target).abs().mean()
        loss.backward()
        opt.step()

    step()  # allocate optimizer state before measuring memory
    _sync()
    torch.cuda.reset_peak_memory_stats()
    times = _time_cuda(step, steps, warmup)
    model.activation_checkpointing = False
    del opt
    return {"train_s_per_step": statistics.median(times), "train_s_all": times,
            "train_peak_gib": torch.cuda.max_memory_allocated() / 2**30, "checkpointing": checkpointing}


def accuracy(model, samples: int) -> dict:
    """bf16-autocast output of the current backend vs the plain path in float32, same weights and input."""
    model.eval()
    gen = torch.Generator(device="cuda").manual_seed(123)
    wave = torch.randn(1, 2, samples, device="cuda", generator=gen) * 0.1
    backend = mamba2.get_backend()
    with torch.inference_mode():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.forward_waveform(wave).float()
        out32 = model.forward_waveform(wave).float()
        mamba2.set_backend("torch")
        try:
            ref = model.forward_waveform(wave).float()
        finally:
            mamba2.set_backend(backend)
    return {"rel_err_bf16_vs_plain_fp32": _rel(out, ref), "rel_err_fp32_vs_plain_fp32": _rel(out32, ref)}


def profile(model, batch: int, samples: int, path: str | None, train: bool = False) -> str:
    """Top CUDA kernels of one inference batch (or, with `train`, one forward + backward without checkpointing)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    model.train(train)
    wave = torch.randn(batch, 2, samples, device="cuda") * 0.1

    def once():
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.set_grad_enabled(train):
            out = model.forward_waveform(wave)
        if train:
            out.float().abs().mean().backward()
        _sync()

    once()
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        once()
    model.zero_grad(set_to_none=True)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    if path:
        with open(path, "w") as f:
            f.write(table)
    return table


def conv_sweep() -> list[dict]:
    """Time the conv1d+SiLU kernels alone (bf16, both directions, time-axis size at batch 8: 496 sequences × 801
    positions × 1280 channels, read from a wider in-projection as in the block) over their tile settings."""
    from bsmamba2.kernels import conv

    s, l, c, k = 496, 801, 1280, 4
    zx = torch.randn(s, l, 2, 2320, device="cuda", dtype=torch.bfloat16)
    raw = zx[..., 1024:1024 + c]  # (s, l, 2, c), strided like the block's view
    w = 0.5 * torch.randn(2, c, k, device="cuda")
    b = 0.1 * torch.randn(2, c, device="cuda")
    dout = torch.randn(2, s, l, c, device="cuda", dtype=torch.bfloat16)
    saved = {name: getattr(conv, name) for name in ("_FWD_BLOCK_C", "_FWD_ROWS", "_FWD_WARPS", "_BWD_BLOCK_C",
                                                    "_BWD_ROWS", "_BWD_WARPS", "_BWD_MIN_ROWS")}
    rows = []
    for bc, per_step, warps in ((256, 8, 1), (256, 4, 1), (256, 4, 2), (128, 4, 1), (512, 4, 2)):
        conv._FWD_BLOCK_C, conv._FWD_ROWS, conv._FWD_WARPS = bc, per_step, warps
        f = statistics.median(_time_cuda(lambda: conv.conv_silu_fwd(raw, w, b), 10, 2))
        rows.append({"kernel": "conv_fwd", "block_c": bc, "rows": per_step, "warps": warps, "ms": f * 1e3})
        print(f"conv fwd block_c {bc} rows {per_step} warps {warps}: {f * 1e3:.2f} ms", flush=True)
    for bc, per_step, warps in ((256, 4, 1), (128, 4, 1), (256, 8, 1), (256, 4, 2)):
        conv._BWD_BLOCK_C, conv._BWD_ROWS, conv._BWD_WARPS = bc, per_step, warps
        bw = statistics.median(_time_cuda(lambda: conv.conv_silu_bwd(dout, raw, w, b), 10, 2))
        rows.append({"kernel": "conv_bwd", "block_c": bc, "rows": per_step, "warps": warps, "ms": bw * 1e3})
        print(f"conv bwd block_c {bc} rows {per_step} warps {warps}: {bw * 1e3:.2f} ms", flush=True)
    for name, value in saved.items():
        setattr(conv, name, value)
    return rows


def scan_sweep() -> list[dict]:
    """Time the SSD kernels alone (bf16, both directions in one launch) at the model's two axes, over chunk length
    and warps. Band axis: 2·b·t sequences of 62; time axis: 2·b·62 sequences of 801 (b = 8)."""
    from bsmamba2.kernels.ssd import ssd_bwd, ssd_fwd

    h, p, n, b = 16, 64, 128, 8
    rows = []
    for axis, s, l in (("band", 2 * b * 801, 62), ("time", 2 * b * 62, 801)):
        x = torch.randn(s, l, h, p, device="cuda", dtype=torch.bfloat16)
        dt = torch.nn.functional.softplus(torch.randn(s, l, h, device="cuda") - 2)
        A = -torch.rand(2, h, device="cuda") - 0.1
        D = torch.randn(2, h, device="cuda")
        B = torch.randn(s, l, 1, n, device="cuda", dtype=torch.bfloat16)
        C = torch.randn(s, l, 1, n, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn_like(x)
        # warps per program, and (long sequences) the grid order: heads of a sequence first, or sequences first
        variants = [(w, "1") for w in (4, 8)] + ([] if l <= 64 else [(None, "0")])
        for warps, heads_first in variants:
            os.environ["BSMAMBA2_SSD_HEADS_FIRST"] = heads_first
            for kern in ("FWD", "FWD_BAND", "BWD", "BWD_STATES"):
                if warps is None:
                    os.environ.pop(f"BSMAMBA2_SSD_WARPS_{kern}", None)  # the tuned defaults
                else:
                    os.environ[f"BSMAMBA2_SSD_WARPS_{kern}"] = str(warps)
            label = f"scan {axis} warps {warps or 'default'} heads_first {heads_first}"
            try:
                f = statistics.median(_time_cuda(lambda: ssd_fwd(x, dt, A, B, C, D, 2), 10, 2))
                bw = statistics.median(_time_cuda(lambda: ssd_bwd(dy, x, dt, A, B, C, D, 2), 10, 2))
            except Exception as e:  # a variant that does not compile (shared memory) is skipped
                rows.append({"axis": axis, "warps": warps, "heads_first": heads_first, "error": str(e)[:200]})
                print(f"{label}: {str(e)[:200]}", flush=True)
                continue
            rows.append({"axis": axis, "warps": warps, "heads_first": heads_first, "fwd_ms": f * 1e3,
                         "bwd_ms": bw * 1e3})
            print(f"{label}: fwd {f * 1e3:.2f} ms  bwd {bw * 1e3:.2f} ms", flush=True)
    for key in [k for k in os.environ if k.startswith("BSMAMBA2_SSD_")]:
        os.environ.pop(key)
    return rows


def format_table(results: list[dict]) -> str:
    """The results as the printed table: one row per training mode (--checkpointing both: two), the inference
    columns and the error on a model's first row, then a line per training run that ran out of memory."""
    lines = ["model        backend  batch  audio-s/s  train s/step  peak GiB  ckpt  rel.err bf16 (fp32)"]
    for r in results:
        err = (f"{r['rel_err_bf16_vs_plain_fp32']:.2e} ({r['rel_err_fp32_vs_plain_fp32']:.1e})"
               if "rel_err_bf16_vs_plain_fp32" in r else "-")
        runs = [t for t in r.get("training", []) if t is not None]
        for i, t in enumerate([t for t in runs if not t.get("train_oom")] or [{}]):
            infer = f"{r['model']:<12} {r['backend']:<8} {r['batch']:>5}  {r.get('audio_s_per_s', math.nan):>9.1f}"
            lines.append(f"{infer if i == 0 else '':<38}  {t.get('train_s_per_step', math.nan):>12.3f}  "
                         f"{t.get('train_peak_gib', math.nan):>8.1f}  {str(t.get('checkpointing', '-')):<5} "
                         f"{err if i == 0 else ''}  {r.get('error', '') if i == 0 else ''}".rstrip())
        lines += [f"{'':>12} training OOM with checkpointing={t['checkpointing']}" for t in runs if t.get("train_oom")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="mamba:torch,mamba:triton,roformer:-",
                    help="comma-separated model:backend pairs (model mamba|roformer; backend torch|triton|-)")
    ap.add_argument("--seconds", type=float, default=8.0, help="chunk length in seconds (8 s = 801 frames)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--train-batch", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--checkpointing", default="auto", choices=["auto", "on", "off", "both"],
                    help="activation checkpointing in training; auto: off, and on if off runs out of memory")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of one fast-backend inference batch")
    ap.add_argument("--scan-sweep", action="store_true", help="first time the SSD kernels alone over chunk/warps")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 1
    out_dir = os.environ.get("OUT")
    out_path = args.out or (os.path.join(out_dir, "bench_gpu.json") if out_dir else None)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    samples = int(round(args.seconds * SR))
    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "command": " ".join(sys.argv), "seconds": args.seconds,
            "frames": samples // 441 + 1}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    from bsmamba2.kernels.ssd import block_q_for, time_scan_kernel

    probe = torch.zeros(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16)  # the model's headdim and dtype
    bc = probe.new_zeros(1, 1, 1, 128)  # d_state 128
    meta["time_scan"] = time_scan_kernel(probe, bc, bc, block_q_for(meta["frames"]))
    print(json.dumps(meta), flush=True)
    results = []
    if args.scan_sweep:
        meta["conv_sweep"] = conv_sweep()
        meta["scan_sweep"] = scan_sweep()
    for run in args.runs.split(","):
        arch, backend = run.split(":")
        row = {"model": "BSMamba2" if arch == "mamba" else "BS-RoFormer", "backend": backend,
               "batch": args.batch, "train_batch": args.train_batch}
        results.append(row)
        if backend != "-":
            mamba2.set_backend(backend)
        try:
            model = _make(arch)
            row["params"] = sum(p.numel() for p in model.parameters())
            t0 = time.perf_counter()
            row.update(bench_inference(model, args.batch, samples, args.iters, warmup=2))
            row["first_calls_s"] = time.perf_counter() - t0
            print(f"{run}: inference {row['audio_s_per_s']:.1f} audio-s/s", flush=True)
            if arch == "mamba":
                row.update(accuracy(model, samples))
            if not args.no_train:
                modes = {"auto": [False], "on": [True], "off": [False], "both": [False, True]}[args.checkpointing]
                for ckpt in modes:
                    try:
                        r = bench_training(model, args.train_batch, samples, args.steps, 1, ckpt)
                    except torch.OutOfMemoryError:
                        r = {"train_oom": True, "checkpointing": ckpt}
                        if args.checkpointing == "auto" and not ckpt:
                            modes.append(True)
                    row.setdefault("training", []).append(r)
                    torch.cuda.empty_cache()
            if args.profile and backend == "triton":
                row["profile"] = profile(model, args.batch, samples,
                                         os.path.join(out_dir, "profile.txt") if out_dir else None)
                row["profile_train"] = profile(model, args.train_batch, samples,
                                               os.path.join(out_dir, "profile_train.txt") if out_dir else None,
                                               train=True)
                print(row["profile"], flush=True)
        except Exception as e:  # keep going: one failing run must not lose the others' numbers
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        finally:
            model = None
            torch.cuda.empty_cache()
        if out_path:
            with open(out_path, "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=1)

    print("\n" + format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
