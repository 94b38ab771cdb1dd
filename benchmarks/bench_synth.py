"""Throughput of the synthetic song generator: seconds of audio generated per CPU-second on one core.

Usage:
    python benchmarks/bench_synth.py [--seconds 30] [--songs 6] [--activity sparse mixed dense] [--write DIR]

Runs single-threaded (as a data-loader worker would) and reports CPU time (process time, so that other load on
the machine barely matters) and wall time per song. With --write it also times `write_track` (PCM16 WAVs + JSON).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from bsmamba2.data.synth import ACTIVITIES, generate_song  # noqa: E402

from common import print_stamp  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--songs", type=int, default=6, help="songs per activity pattern")
    parser.add_argument("--activity", nargs="+", choices=ACTIVITIES, default=list(ACTIVITIES))
    parser.add_argument("--write", type=Path, default=None, help="also time writing tracks under this folder")
    args = parser.parse_args()

    print_stamp("cpu")
    generate_song(10_000, 2.0)  # warm-up: imports, FFT plans
    print(f"# bench_synth: {args.songs} songs x {args.seconds:g} s per pattern, 44.1 kHz stereo, 1 thread, "
          f"{platform.processor() or platform.machine()}, numpy/scipy")
    print(f"{'activity':8s} {'audio-s/cpu-s':>14s} {'min':>7s} {'max':>7s} {'cpu-s/song':>11s} {'wall-s/song':>12s}")
    overall = []
    for activity in args.activity:
        rates, cpu, wall = [], [], []
        for i in range(args.songs):
            c0, w0 = time.process_time(), time.perf_counter()
            generate_song((1234, i), args.seconds, activity)
            c1, w1 = time.process_time(), time.perf_counter()
            cpu.append(c1 - c0)
            wall.append(w1 - w0)
            rates.append(args.seconds / (c1 - c0))
        overall += rates
        print(f"{activity:8s} {args.seconds * len(cpu) / sum(cpu):14.1f} {min(rates):7.1f} {max(rates):7.1f} "
              f"{statistics.mean(cpu):11.2f} {statistics.mean(wall):12.2f}")
    print(f"{'all':8s} {statistics.harmonic_mean(overall):14.1f}")
    if args.write is not None:
        from bsmamba2.commands.synth import write_track

        args.write.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=args.write) as tmp:
            c0 = time.process_time()
            for i in range(args.songs):
                write_track(Path(tmp) / f"t{i}", [1234, 9, i], {"seconds": args.seconds, "vocal_activity": "mixed",
                                                               "sample_rate": 44100, "subtype": "PCM_16"})
            c1 = time.process_time()
        print(f"generate + write PCM16 track: {args.seconds * args.songs / (c1 - c0):.1f} audio-s/cpu-s")


if __name__ == "__main__":
    main()
