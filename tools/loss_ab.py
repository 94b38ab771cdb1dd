"""Same-process A/B of the training loss: the multi-resolution STFT term on the difference (what `losses.py` does)
against the plain form that transforms prediction and target and subtracts, forward + backward, alternating.

    PYTHONPATH=src python3 tools/loss_ab.py [--device cuda] [--batch 5] [--seconds 8] [--repeats 3]

Prints, per repeat, milliseconds per loss forward + backward (median; CUDA events on a GPU) and the peak memory of
each form above the inputs, and the relative difference of the two loss values.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import SR, time_cuda  # noqa: E402

from bsmamba2.losses import SeparationLoss  # noqa: E402


class TwoTransformLoss(SeparationLoss):
    """The plain form of the same loss: STFT(prediction) - STFT(target) per resolution."""

    def forward(self, pred, target):
        with torch.autocast(pred.device.type, enabled=False):
            p, t = pred.float(), target.float()
            time_part = (p - t).abs().mean()
            spec = self.stft.plain(p, t)
        total = self.time_weight * time_part + spec
        return total, {"time": time_part.detach(), "stft": spec.detach()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    target = torch.randn(args.batch, 1, 2, int(args.seconds * SR), device=dev)
    pred = (target + 0.1 * torch.randn_like(target)).bfloat16().requires_grad_(True)  # as the model hands it over
    forms = {"difference": SeparationLoss().to(dev), "two transforms": TwoTransformLoss().to(dev)}

    def step(fn):
        def run():
            pred.grad = None
            fn(pred, target)[0].backward()
        return run

    values = {name: float(fn(pred, target)[0].detach()) for name, fn in forms.items()}
    a, b = values.values()
    print(f"loss values {values}; relative difference {abs(a - b) / abs(b):.2e}")
    for r in range(args.repeats):
        for name, fn in forms.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                ms = statistics.median(time_cuda(step(fn), args.iters, 2)) * 1e3
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            else:
                times = []
                for _ in range(args.iters):
                    t0 = time.perf_counter()
                    step(fn)()
                    times.append((time.perf_counter() - t0) * 1e3)
                ms, peak = statistics.median(times), float("nan")
            print(f"repeat {r + 1} {name:15s} {ms:8.2f} ms per forward + backward, peak {peak:.2f} GiB above inputs",
                  flush=True)


if __name__ == "__main__":
    main()
