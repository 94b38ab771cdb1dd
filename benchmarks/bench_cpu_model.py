"""Paper-size BSMamba2 and BS-RoFormer forward pass on this CPU: seconds per 8-s stereo chunk, real-time factor,
peak RSS; and how peak memory grows with input length (it must be linear along time: no frames × frames tensors).
`--precisions fp32 bf16` also measures each with bf16 projections (`quantize.linear_bf16`, the default on CPUs with
bf16 units).

Each measurement runs in a fresh subprocess so that peak RSS belongs to that measurement alone.

    python benchmarks/bench_cpu_model.py [--threads 2] [--repeats 2] [--lengths 4 8 16] [--precisions fp32 bf16]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import build, format_table, print_stamp, write_json


def child(arch: str, seconds: float, threads: int, repeats: int, precision: str) -> None:
    """One measurement, in the process `measure` starts: the forward pass `repeats` times, one JSON line out."""
    import torch

    from bsmamba2.quantize import linear_bf16

    torch.set_num_threads(threads)
    model = build(arch).eval()
    if precision == "bf16":
        model = linear_bf16(model)
    wave = 0.1 * torch.randn(1, 2, int(seconds * 44100))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.forward_waveform(wave)
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"arch": arch, "precision": precision, "seconds": seconds, "best_s": min(times), "times": times,
                      "peak_rss_mib": peak, "rss_before_forward_mib": base}))


def measure(arch: str, seconds: float, threads: int, repeats: int, precision: str) -> dict:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", arch, str(seconds), str(threads),
                          str(repeats), precision], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        arch, seconds, threads, repeats, precision = sys.argv[2:7]
        child(arch, float(seconds), int(threads), int(repeats), precision)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lengths", type=float, nargs="*", default=[4.0, 8.0, 16.0])
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32"])
    parser.add_argument("--json", help="also write the rows (and the stamp) to this file")
    args = parser.parse_args()
    meta = print_stamp("cpu")
    meta["device"] = meta["device"].split(",")[0] + f", {args.threads} threads"  # the measuring processes' threads
    rows = []
    for arch in ("bsmamba2", "bsroformer"):
        for seconds in args.lengths if arch == "bsmamba2" else [8.0]:
            for precision in args.precisions:
                r = measure(arch, seconds, args.threads, args.repeats, precision)
                r["rtf"] = r["best_s"] / seconds
                r["forward_mib"] = r["peak_rss_mib"] - r["rss_before_forward_mib"]
                rows.append(r)
                print(f"{arch} {precision} {seconds:g} s: {r['best_s']:.2f} s per chunk, RTF {r['rtf']:.2f}, "
                      f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    print(format_table([("arch", "model"), ("precision", "precision"), ("seconds", "input s"), ("best_s", "s/chunk"),
                        ("rtf", "RTF"), ("peak_rss_mib", "peak RSS MiB"), ("forward_mib", "forward MiB")], rows))
    if args.json:
        write_json(args.json, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
