"""Benchmark: cSDR/uSDR time against museval on the same real track, and end-to-end evaluation time per track.

    python benchmarks/bench_metrics.py                        # CPU: metrics + official tiny checkpoint
    python benchmarks/bench_metrics.py --tile 210             # also a 3.5-min track (the real sample repeated)
    python benchmarks/bench_metrics.py --model paper --device cuda --precision bf16   # paper-size model on a GPU

One run each (no repetition): the museval ratio is large enough that run-to-run noise does not matter.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BSMAMBA2_SHARED", ROOT.parent / "shared"))
TRACK = SHARED / "data" / "musdb18hq-sample" / "train" / "Music Delta - 80s Rock"
CKPT = SHARED / "fixtures" / "official" / "official_tiny_a.ckpt"


def museval_metrics():
    from bsmamba2.metrics import load_museval_metrics

    try:
        return load_museval_metrics()
    except ImportError as e:
        sys.exit(str(e))


def bench_metrics(tile: float | None) -> None:
    from bsmamba2.metrics import csdr, csdr_frames, usdr

    mm = museval_metrics()
    vocals, sr = sf.read(TRACK / "vocals.wav", dtype="float32")  # (time, channels)
    mixture, _ = sf.read(TRACK / "mixture.wav", dtype="float32")
    cases = [("real track", vocals, mixture)]
    if tile:
        reps = int(np.ceil(tile * sr / len(vocals)))
        n = int(tile * sr)
        cases.append((f"real track tiled to {tile:g} s", np.tile(vocals, (reps, 1))[:n], np.tile(mixture, (reps, 1))[:n]))
    for name, ref, mix in cases:
        est = 0.7 * ref + 0.1 * mix
        t0 = time.perf_counter()
        sdr, *_ = mm.bss_eval(ref[None], est[None], window=sr, hop=sr)
        t_museval = time.perf_counter() - t0
        t0 = time.perf_counter()
        frames = csdr_frames(est.T, ref.T, sr)
        value = csdr(est.T, ref.T, sr)
        u = usdr(est.T, ref.T)
        t_ours = time.perf_counter() - t0
        diff = float(np.nanmax(np.abs(frames - sdr[0])))
        print(
            f"metrics, {name} ({len(ref) / sr:.1f} s stereo): museval bss_eval {t_museval:.3f} s, "
            f"bsmamba2 csdr+usdr {t_ours * 1e3:.2f} ms, speed-up x{t_museval / t_ours:.0f}, "
            f"max |frame difference| {diff:.2e} dB (cSDR {value:.4f} dB, museval {np.nanmedian(sdr):.4f} dB, uSDR {u:.4f})"
        )


def bench_evaluate(model_name: str, device: str, precision: str | None, segment: float) -> None:
    from bsmamba2 import evaluate as ev
    from bsmamba2.checkpoint import load_model
    from bsmamba2.config import BSMamba2Config
    from bsmamba2.build import build_model
    from bsmamba2.separate import Separator

    if model_name == "official-tiny":
        model = load_model(CKPT)
    else:  # the paper's size with random weights: timing only
        model = build_model(BSMamba2Config()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "musdb"
        (root / "test").mkdir(parents=True)
        os.symlink(TRACK, root / "test" / TRACK.name)
        tracks = ev.find_tracks(root, "test")
        sep = Separator(model, device=device, precision=precision, segment=segment, mode="paper")
        sep.separate(torch.zeros(2, sep.segment_samples), sep.sample_rate)  # warm-up (kernels, allocator)
        settings = ev.EvalSettings(checkpoint=model_name, segment=segment, precision=precision or "fp32")
        t0 = time.perf_counter()
        res = ev.evaluate_tracks(sep, tracks, settings, Path(tmp) / "report", progress=False, sample_rate=sep.sample_rate)
        total = time.perf_counter() - t0
    row = res.rows[0]
    scoring = row["seconds"] - row["separate_s"]
    print(
        f"evaluate, {model_name} on {sep.device} ({precision or 'fp32'}, paper mode, {segment:g}-s segments), "
        f"{row['duration_s']:.1f}-s track: {total:.2f} s per track end to end "
        f"(separation {row['separate_s']:.2f} s = {row['separate_s'] / row['duration_s']:.3f} s per audio second; "
        f"reading + scoring {scoring:.3f} s; reports {total - row['seconds']:.3f} s)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tile", type=float, help="also time a track of this many seconds (the sample repeated)")
    p.add_argument("--model", choices=("official-tiny", "paper", "none"), default="official-tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--segment", type=float, default=8.0)
    p.add_argument("--skip-metrics", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    print(f"device: {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_metrics:
        bench_metrics(args.tile)
    if args.model != "none":
        bench_evaluate(args.model, args.device, args.precision, args.segment)


if __name__ == "__main__":
    main()
