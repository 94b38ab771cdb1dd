"""Memory and speed of the training step with activation checkpointing off, auto and full, and auto on a smaller card.

For each model (the shipped paper configs, bf16, batch 5 × 8 s by default) one process runs, in this order:
    full   every axis module checkpointed (`train.activation_checkpointing: true`)
    auto   what `bsmamba2 train` does with `auto`: the dry-run measurement and the plan (logged), then steps
    auto@N the same with the allocator capped at N GiB (`torch.cuda.set_per_process_memory_fraction`): a 24 GB card
           (23.5 GiB: its ~0.5 GiB CUDA context is outside the cap); it must train without running out of memory
    off    no checkpointing (may run out of memory on an 80 GB card: reported, not fatal)
    saved  what one time-axis and one band-axis module keep for backward at these shapes: each tensor autograd
           saves (shape, dtype, GiB; one row per storage), the inputs to a leaner backward
Each mode: a fresh model, AdamW, EMA and the paper's loss; one step (optimiser state), `--warmup` steps, then the
median of `--steps` timed steps (`bsmamba2.train.train_step`, the training loop's own step) and the peak memory over
the timed steps (allocated and reserved); `--profile N` then profiles one more step and prints its N costliest
kernels (where a step's time goes). Writes JSON (`--out`, or $OUT/bench_memory.json when $OUT is set).

GPU (H100 / H200), both models:
    PYTHONPATH=src python benchmarks/bench_memory.py
CPU smoke test of the script itself (tiny models; `auto` is no checkpointing on CPU, the cap is skipped):
    PYTHONPATH=src python benchmarks/bench_memory.py --device cpu --tiny --seconds 0.5 --batch 1 --steps 1 --warmup 0
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import logging
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from bsmamba2.config import BSMamba2Config, RoFormerConfig
from bsmamba2.losses import SeparationLoss
from bsmamba2.memory import GiB
from bsmamba2.build import build_model
from bsmamba2.train import EMA, Dist, WaveformModel, _choose_checkpointing, make_optimizer, train_step
from bsmamba2.trainconfig import load_run_config

CONFIGS = {"bsmamba2": "bsmamba2-paper", "bsroformer": "bsroformer-paper"}


def run_config(arch: str, args):
    """The shipped paper config at the benchmark's batch and excerpt length (tiny model with --tiny)."""
    cfg = load_run_config(CONFIGS[arch], [f"train.batch_size={args.batch}", f"train.effective_batch={args.batch}",
                                          f"data.segment_seconds={args.seconds}"])
    if args.tiny:
        cfg = dataclasses.replace(cfg, model=(BSMamba2Config if arch == "bsmamba2" else RoFormerConfig).tiny())
    return cfg


def bench(arch: str, mode: str, args, device: torch.device, cap_gib: float | None = None) -> dict:
    """One mode: `full`, `off` or `auto` (with `cap_gib`, under a per-process memory cap)."""
    cfg = run_config(arch, args)
    cuda = device.type == "cuda"
    result: dict = {"arch": arch, "mode": mode if cap_gib is None else f"auto@{cap_gib:g}GiB", "cap_gib": cap_gib}
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(1.0 if cap_gib is None else cap_gib * GiB / total, device)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).train()
    ema = EMA(model, cfg.train.ema_decay)
    optimizer = make_optimizer(model, cfg.train)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    tc = cfg.train
    loss_fn = SeparationLoss(tc.time_weight, tc.stft_windows, tc.stft_hop, tc.stft_min_nfft).to(device)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    train_log = logging.getLogger("bsmamba2.train")
    train_log.addHandler(handler)
    train_log.setLevel(logging.INFO)
    try:
        t0 = time.perf_counter()
        if mode == "auto":
            _choose_checkpointing(model, optimizer, loss_fn, cfg, Dist(device=device), autocast)
            result["decide_s"] = time.perf_counter() - t0
            result["decision"] = " ".join(r.getMessage() for r in records)
        else:
            model.activation_checkpointing = mode == "full"
        chosen = model.activation_checkpointing
        result["checkpointed_modules"] = (2 * len(model.layers) if chosen is True else 0 if chosen is False
                                          else len(chosen))
        samples = round(args.seconds * cfg.data.sample_rate)
        gen = torch.Generator(device=device).manual_seed(1)
        mix = 0.1 * torch.randn(args.batch, model.audio_channels, samples, device=device, generator=gen)
        tgt = 0.05 * torch.randn(args.batch, len(model.stems), model.audio_channels, samples, device=device,
                                 generator=gen)
        net = WaveformModel(model)

        def step():
            return train_step(net, model, [(mix, tgt)], 1, loss_fn, optimizer, scaler, ema, autocast, tc.grad_clip)

        def sync():
            if cuda:
                torch.cuda.synchronize(device)

        step()  # AdamW's state
        for _ in range(args.warmup):
            step()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.steps):
            sync()
            t = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t)
        result.update(s_per_step=statistics.median(times), s_all=times, oom=False)
        if cuda:
            result.update(peak_gib=torch.cuda.max_memory_allocated(device) / GiB,
                          reserved_gib=torch.cuda.max_memory_reserved(device) / GiB)
        if args.profile:
            result["profile"] = profile_step(step, sync, cuda, args.profile)
    except torch.cuda.OutOfMemoryError:
        result.update(oom=True)
    except ValueError as err:  # auto: the batch does not fit even with full checkpointing (the advice)
        result.update(error=str(err))
    finally:
        train_log.removeHandler(handler)
    del model, ema, optimizer
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    return result


def profile_step(step, sync, cuda: bool, top: int) -> list[dict]:
    """One more step under torch.profiler: the `top` kernels (CUDA) or operators (CPU) by self time, ms per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities) as prof:
        step()
        sync()
    rows = []
    for e in prof.key_averages():
        self_us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if self_us > 0 and (not cuda or e.device_type.name == "CUDA"):
            rows.append({"name": e.key, "ms": self_us / 1e3, "calls": e.count})
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    print(f"{'':<10} profile of one step: {total:.1f} ms of {'kernel' if cuda else 'operator'} self time; top {top}:",
          flush=True)
    for r in rows[:top]:
        print(f"{'':<12}{r['ms']:8.2f} ms {100 * r['ms'] / total:5.1f}% {r['calls']:6d}x  {r['name'][:90]}", flush=True)
    return [{"total_ms": total}] + rows[:top]


def saved_for_backward(arch: str, args, device: torch.device) -> list[dict]:
    """The tensors one time-axis and one band-axis module of layer 0 save for backward (forward only, under the
    training autocast), one entry per storage, largest first."""
    cfg = run_config(arch, args)
    cuda = device.type == "cuda"
    model = build_model(cfg.model).to(device).train()
    samples = round(args.seconds * cfg.data.sample_rate)
    frames = samples // cfg.model.stft.hop_length + 1
    b, k, d = args.batch, len(cfg.model.band_widths), cfg.model.dim
    rows = []
    for axis, (sequences, length) in (("time", (b * k, frames)), ("band", (b * frames, k))):
        x = torch.randn(sequences, length, d, device=device, requires_grad=True)  # (s, l, d)
        storages: dict[int, dict] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            storages.setdefault(storage.data_ptr(), {"axis": axis, "shape": list(t.shape), "dtype": str(t.dtype),
                                                     "gib": storage.nbytes() / GiB})
            return t

        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        with ctx, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            xin = x.to(torch.bfloat16) if cuda else x  # the latent is bf16 between modules under autocast
            model.layers[0][0 if axis == "time" else 1](xin)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        skip = params | {x.untyped_storage().data_ptr()}  # the weights, and the float32 input made here
        rows += sorted((r for ptr, r in storages.items() if ptr not in skip), key=lambda r: -r["gib"])
        del x
    del model
    if cuda:
        torch.cuda.empty_cache()
    return rows


def format_row(r: dict) -> str:
    def num(key: str, fmt: str) -> str:
        return format(r[key], fmt) if r.get(key) is not None else "-"

    status = "OUT OF MEMORY" if r.get("oom") else r.get("error", "")
    ckpt = str(r.get("checkpointed_modules", "-"))
    return (f"{r['arch']:<10} {r['mode']:<14} {ckpt:>4} {num('s_per_step', '.3f'):>7} {num('peak_gib', '.1f'):>7} "
            f"{num('reserved_gib', '.1f'):>8}  {status}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="bsmamba2,bsroformer")
    ap.add_argument("--modes", default="saved,full,auto,cap,off",
                    help="any of saved, full, auto, cap (auto under --cap-gib), off")
    ap.add_argument("--cap-gib", type=float, default=23.5, help="memory cap of the simulated smaller card")
    ap.add_argument("--batch", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--tiny", action="store_true", help="test-size models (smoke test)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile one more step of each mode and print its N costliest kernels")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if cuda:
        torch.set_float32_matmul_precision("high")
    print(f"{'model':<10} {'mode':<14} {'ckpt':>4} {'s/step':>7} {'peak GiB':>7} {'reserved':>8}", flush=True)
    results = []
    for arch in args.archs.split(","):
        for mode in args.modes.split(","):
            if mode == "cap" and not cuda:
                continue  # a memory cap means nothing on CPU
            if mode == "saved":
                rows = saved_for_backward(arch, args, device)
                results.append({"arch": arch, "mode": "saved", "tensors": rows})
                for axis in ("time", "band"):
                    mine = [r for r in rows if r["axis"] == axis]
                    print(f"{arch:<10} saved for backward by one {axis}-axis module: "
                          f"{sum(r['gib'] for r in mine):.2f} GiB in {len(mine)} tensors", flush=True)
                    for r in mine[:10]:
                        print(f"{'':<12}{r['gib']:7.3f} GiB  {r['dtype']:<15} {r['shape']}", flush=True)
                    if len(mine) > 10:
                        print(f"{'':<12}{sum(r['gib'] for r in mine[10:]):7.3f} GiB  in {len(mine) - 10} smaller",
                              flush=True)
                continue
            try:
                cap = args.cap_gib if mode == "cap" else None
                r = bench(arch, "auto" if mode == "cap" else mode, args, device, cap)
            except Exception as err:  # keep going: one failing configuration should not hide the others
                traceback.print_exc()
                r = {"arch": arch, "mode": mode, "error": repr(err)}
            results.append(r)
            print(format_row(r), flush=True)
            if r.get("decision"):
                print(f"{'':<10} {r['decision']} (decided in {r['decide_s']:.1f} s)", flush=True)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu", "batch": args.batch,
            "seconds": args.seconds, "results": results}
    out = args.out or (os.path.join(os.environ["OUT"], "bench_memory.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
