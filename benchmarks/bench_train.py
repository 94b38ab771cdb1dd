"""Training-step benchmark of the real recipe: paper-size BSMamba2 and BS-RoFormer, batch 5 × 8 s stereo, bf16.

One step is exactly the training loop's (`bsmamba2.train.train_step`): bf16 autocast forward, the paper's loss
(10·L1 + multi-resolution STFT L1), backward, clipping at 3, AdamW, EMA update. Data are random tensors already on
the GPU (the loader is measured by bench_loader.py). Reports the median seconds per step and the peak GPU memory,
with and without activation checkpointing, in one process, and writes JSON.

Single GPU (one process, both models):
    PYTHONPATH=src python benchmarks/bench_train.py
Data-parallel scaling (same per-GPU batch 5, DDP/NCCL; step time 1 vs N GPUs = weak-scaling efficiency):
    PYTHONPATH=src torchrun --nproc-per-node 1 benchmarks/bench_train.py --archs bsmamba2 --checkpointing on
    PYTHONPATH=src torchrun --nproc-per-node 2 benchmarks/bench_train.py --archs bsmamba2 --checkpointing on
CPU smoke test of the script itself:
    python benchmarks/bench_train.py --device cpu --tiny --seconds 1 --batch 1 --steps 1 --warmup 0
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from bsmamba2 import mamba2
from bsmamba2.config import BSMamba2Config, RoFormerConfig
from bsmamba2.losses import SeparationLoss
from bsmamba2.build import build_model
from bsmamba2.train import EMA, WaveformModel, setup_distributed, train_step

SR = 44100


def bench(arch: str, args, ddp, checkpointing: bool) -> dict:
    torch.manual_seed(0)
    if arch == "bsmamba2":
        cfg = BSMamba2Config.tiny() if args.tiny else BSMamba2Config()
    else:
        cfg = RoFormerConfig.tiny() if args.tiny else RoFormerConfig()
    device = ddp.device
    cuda = device.type == "cuda"
    model = build_model(cfg).to(device).train()
    model.activation_checkpointing = checkpointing
    net = WaveformModel(model)
    if ddp.enabled:
        net = DistributedDataParallel(net, device_ids=[ddp.local_rank] if cuda else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    ema = EMA(model, 0.999)
    loss_fn = SeparationLoss().to(device)
    samples = int(args.seconds * SR)
    gen = torch.Generator(device=device).manual_seed(ddp.rank)
    mix = 0.1 * torch.randn(args.batch, 2, samples, device=device, generator=gen)  # (b, c, time)
    tgt = 0.05 * torch.randn(args.batch, 1, 2, samples, device=device, generator=gen)  # (b, stems, c, time)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step():
        return train_step(net, model, [(mix, tgt)], 1, loss_fn, optimizer, scaler, ema, autocast, 3.0, ddp.enabled)

    def sync():
        if cuda:
            torch.cuda.synchronize()
        if ddp.enabled:
            dist.barrier()

    step()  # allocates optimizer state
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    result = {
        "arch": arch,
        "params": sum(p.numel() for p in model.parameters()),
        "checkpointing": checkpointing,
        "world": ddp.world,
        "batch_per_process": args.batch,
        "seconds": args.seconds,
        "s_per_step": statistics.median(times),
        "s_all": times,
        "samples_per_s": ddp.world * args.batch / statistics.median(times),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
    }
    del model, net, optimizer, ema
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="bsmamba2,bsroformer")
    ap.add_argument("--checkpointing", choices=["off", "on", "both"], default="both")
    ap.add_argument("--backend", default=None, help="BSMamba2 scan backend (mamba2.set_backend); default: as set")
    ap.add_argument("--batch", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--tiny", action="store_true", help="test-size models (smoke test)")
    ap.add_argument("--out", default=None, help="JSON (default $OUT/bench_train_w<world>.json when $OUT is set)")
    args = ap.parse_args(argv)
    if args.backend:
        mamba2.set_backend(args.backend)
    ddp = setup_distributed(args.device)
    if ddp.device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    flags = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    results = []
    for arch in args.archs.split(","):
        for ckpt in flags:
            try:
                r = bench(arch, args, ddp, ckpt)
            except torch.cuda.OutOfMemoryError:
                r = {"arch": arch, "checkpointing": ckpt, "world": ddp.world, "error": "out of GPU memory"}
                torch.cuda.empty_cache()
            except Exception as err:  # keep going: one failing configuration should not hide the others
                r = {"arch": arch, "checkpointing": ckpt, "world": ddp.world, "error": repr(err)}
                traceback.print_exc()
            results.append(r)
            if ddp.main:
                if "error" in r:
                    print(f"{arch:10s} ckpt={ckpt!s:5s} world={ddp.world}: {r['error']}", flush=True)
                else:
                    peak = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "n/a"
                    print(f"{arch:10s} ckpt={ckpt!s:5s} world={ddp.world}: {r['s_per_step']:.3f} s/step "
                          f"(batch {args.batch}/GPU × {args.seconds:g} s), {r['samples_per_s']:.2f} samples/s, "
                          f"peak {peak}", flush=True)
    if ddp.main:
        meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
                "device": torch.cuda.get_device_name(ddp.device) if ddp.device.type == "cuda" else "cpu",
                "backend": mamba2.get_backend(), "results": results}
        out = args.out or (os.path.join(os.environ["OUT"], f"bench_train_w{ddp.world}.json")
                           if os.environ.get("OUT") else None)
        if out:
            Path(out).write_text(json.dumps(meta, indent=1))
    if ddp.enabled:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
