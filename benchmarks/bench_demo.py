"""`bsmamba2 demo` end to end, as a newcomer runs it: wall time of the whole command and its separation time, for
several variants in alternating rounds (so that the machine's drifting speed hits every variant alike).

Usage:
    python benchmarks/bench_demo.py [--rounds 2] [--variant "NAME=[SRC:]CHECKPOINT [DEMO ARGS]" ...] [--out demo.json]

A variant is a checkpoint (`bundled` for the model in the package), optionally the `src` folder of another tree to
run it with (e.g. a `git archive` of an older commit), and optionally more arguments for `bsmamba2 demo`, to compare
a change with what came before in one run:

    git archive 383f255 src | tar -x -C /tmp/old
    python benchmarks/bench_demo.py --variant before=/tmp/old/src:bundled --variant now=bundled \
        --variant "now-fp32=bundled --precision fp32"

Each run is a fresh process (`python -m bsmamba2 demo`), as the README's first command is: imports, model load,
synthesis, separation, scores and figure. The separation time is the one the command prints ("separated ... in X s").
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, format_table, out_path, print_stamp, write_json

SEPARATED = re.compile(r"separated [\d.]+ s in ([\d.]+) s")


def parse_variant(text: str) -> tuple[str, Path, str, list[str]]:
    """"NAME=[SRC:]CHECKPOINT [DEMO ARGS]" -> (name, src folder, checkpoint or "bundled", extra demo arguments)."""
    name, sep, rest = text.partition("=")
    words = rest.split()
    if not sep or not name or not words:
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME=CHECKPOINT or NAME=SRC:CHECKPOINT, then any demo "
                                         "arguments")
    src, colon, checkpoint = words[0].rpartition(":")
    return name, Path(src) if colon else ROOT / "src", checkpoint, words[1:]


def run_demo(src: Path, checkpoint: str, extra: list[str], workdir: Path) -> dict:
    """One `bsmamba2 demo` in a fresh process; its wall time and the separation time it prints."""
    cmd = [sys.executable, "-m", "bsmamba2", "demo", "-o", str(workdir), *extra]
    if checkpoint != "bundled":
        cmd += ["--checkpoint", checkpoint]
    env = {**os.environ, "PYTHONPATH": str(src)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    found = SEPARATED.search(proc.stdout + proc.stderr)
    return {"total_s": wall, "separate_s": float(found.group(1)) if found else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", type=parse_variant, default=None,
                        help="\"NAME=[SRC:]CHECKPOINT [DEMO ARGS]\" (repeatable; default: now=bundled)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON file (default: $OUT/bench_demo.json when $OUT is set)")
    args = parser.parse_args()
    variants = args.variant or [parse_variant("now=bundled")]

    info = print_stamp("cpu")
    runs: dict[str, list[dict]] = {name: [] for name, *_ in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, src, checkpoint, extra in variants:
                result = run_demo(src, checkpoint, extra, Path(tmp) / f"{name}-{r}")
                runs[name].append(result)
                print(f"round {r + 1} {name}: {result['total_s']:.1f} s in all, separation {result['separate_s']} s",
                      flush=True)
    rows = []
    for name, src, checkpoint, extra in variants:
        total = [x["total_s"] for x in runs[name]]
        sep = [x["separate_s"] for x in runs[name] if x["separate_s"] is not None]
        rows.append({"variant": name, "checkpoint": checkpoint, "src": str(src), "demo_args": extra,
                     "total_median_s": statistics.median(total), "total_min_s": min(total),
                     "separate_median_s": statistics.median(sep) if sep else None,
                     "separate_min_s": min(sep) if sep else None})
    print(format_table([("variant", "variant"), ("total_median_s", "total s (median)"), ("total_min_s", "min"),
                        ("separate_median_s", "separation s (median)"), ("separate_min_s", "min")], rows))
    write_json(out_path(args.out, "bench_demo.json"), {"stamp": info, "rows": rows, "runs": runs})


if __name__ == "__main__":
    main()
