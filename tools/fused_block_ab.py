"""Same-process A/B of the fused inference block (GPU): the paper-size model's inference at batch 8 in bf16, alternating
the path without it (BSMAMBA2_FUSED=0) and with it (=1), so both run on the same machine in the same state.

    PYTHONPATH=src python3 tools/fused_block_ab.py [--repeats 3] [--profile]

Prints the relative difference of the two outputs, then audio-seconds per second for each path per repeat (median of
10 batches after 2 warm-up batches, CUDA events); `--profile` adds the kernel table of three fused batches.
"""

from __future__ import annotations

import argparse
import os
import statistics

import sys
from pathlib import Path

import torch

# The model and the CUDA timing exactly as the benchmarks use them (benchmarks/common.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import SR, build, time_cuda  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fused_block_ab.py needs a CUDA device")
    samples = int(args.seconds * SR)
    model = build("bsmamba2", device="cuda").eval()
    wave = torch.randn(args.batch, 2, samples, device="cuda") * 0.1
    audio = args.batch * samples / SR

    def run():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            return model.forward_waveform(wave)

    outs = {}
    for mode in ("0", "1"):
        os.environ["BSMAMBA2_FUSED"] = mode
        outs[mode] = run().float()
    diff = ((outs["1"] - outs["0"]).norm() / outs["0"].norm()).item()
    print(f"{torch.cuda.get_device_name()}: fused vs unfused output, relative difference {diff:.2e}", flush=True)
    times = {"0": [], "1": []}
    for _ in range(args.repeats):
        for mode in times:
            os.environ["BSMAMBA2_FUSED"] = mode
            times[mode].append(statistics.median(time_cuda(run, 10, 2)))
    for mode, ts in times.items():
        label = "fused" if mode == "1" else "unfused"
        print(f"{label:8s} " + ", ".join(f"{audio / t:.1f}" for t in ts) + " audio-s/s", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

        os.environ["BSMAMBA2_FUSED"] = "1"
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                run()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
