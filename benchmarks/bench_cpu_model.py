"""Paper-size BSMamba2 and BS-RoFormer forward pass on this CPU: seconds per 8-s stereo chunk, real-time factor,
peak RSS; and how peak memory grows with input length (it must be linear along time: no frames × frames tensors).

Each measurement runs in a fresh subprocess so that peak RSS belongs to that measurement alone.

    python benchmarks/bench_cpu_model.py [--threads 2] [--repeats 2] [--lengths 4 8 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
from bsmamba2.config import BSMamba2Config, RoFormerConfig
from bsmamba2.build import build_model
arch, seconds, threads, repeats = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = build_model(BSMamba2Config() if arch == "bsmamba2" else RoFormerConfig()).eval()
wave = 0.1 * torch.randn(1, 2, int(seconds * 44100))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
times = []
with torch.inference_mode():
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.forward_waveform(wave)
        times.append(time.perf_counter() - t0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"arch": arch, "seconds": seconds, "best_s": min(times), "times": times,
                  "peak_rss_mib": peak, "rss_before_forward_mib": base}))
"""


def measure(arch: str, seconds: float, threads: int, repeats: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, arch, str(seconds), str(threads), str(repeats)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lengths", type=float, nargs="*", default=[4.0, 8.0, 16.0])
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rows = []
    print(f"{'model':<11}{'input s':>8}{'s/chunk':>9}{'RTF':>7}{'peak RSS MiB':>14}{'forward MiB':>13}")
    for arch in ("bsmamba2", "bsroformer"):
        for seconds in args.lengths if arch == "bsmamba2" else [8.0]:
            r = measure(arch, seconds, args.threads, args.repeats)
            r["rtf"] = r["best_s"] / seconds
            rows.append(r)
            print(f"{arch:<11}{seconds:>8.1f}{r['best_s']:>9.2f}{r['rtf']:>7.2f}{r['peak_rss_mib']:>14.0f}"
                  f"{r['peak_rss_mib'] - r['rss_before_forward_mib']:>13.0f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
