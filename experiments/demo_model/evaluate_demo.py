"""Score demo models on the demo song and a held-out synthetic test set; write one JSON.

    PYTHONPATH=src python experiments/demo_model/evaluate_demo.py --checkpoint new.safetensors \
        [--baseline old.safetensors] --test-data ROOT [--out eval.json] [--device auto]

For each checkpoint: the demo song exactly as `bsmamba2 demo` makes and separates it (seed 2025, 20 s, sparse
vocals, the whole song in one model call) with uSDR, cSDR, silent-region leakage and the leakage of every silent
gap; and every track of ROOT/test/ (from `bsmamba2 synth --test-tracks N --vocal-activity sparse`), each separated in
one call as well, with per-track uSDR and leakage and their means and medians over tracks.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from bsmamba2 import metrics
from bsmamba2.data.synth import generate_song
from bsmamba2.separate import Separator


def _read(path: Path) -> torch.Tensor:
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    if sr != 44100:
        raise ValueError(f"{path}: expected 44100 Hz, got {sr}")
    return torch.from_numpy(np.ascontiguousarray(data.T))


def score(sep: Separator, mix: torch.Tensor, ref: torch.Tensor, sr: int, csdr: bool) -> dict:
    est = sep.separate(mix, sr)["vocals"]
    out = {"usdr": metrics.usdr(est, ref), "leakage_db": metrics.silent_leakage(est, ref, mix, sr)}
    if csdr:
        out["csdr"] = metrics.csdr(est, ref, sr)
        out["leakage_per_gap"] = metrics.silent_gap_leakage(est, ref, mix, sr)
    return out


def evaluate(checkpoint: Path, tracks: list[Path], device: str) -> dict:
    sep = Separator(checkpoint, device=device, segment=0.0, overlap=0.0)
    song = generate_song(2025, 20.0, "sparse")
    t0 = time.perf_counter()
    demo = score(sep, torch.from_numpy(song.mixture), torch.from_numpy(song.stems["vocals"]), song.sample_rate, True)
    demo["seconds_taken"] = time.perf_counter() - t0
    rows = []
    for folder in tracks:
        mix, ref = _read(folder / "mixture.wav"), _read(folder / "vocals.wav")
        rows.append({"track": folder.name, **score(sep, mix, ref, 44100, False)})
    summary = {}
    for key in ("usdr", "leakage_db"):
        vals = np.array([r[key] for r in rows], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        summary[key] = {"mean": float(vals.mean()) if vals.size else None,
                        "median": float(np.median(vals)) if vals.size else None}
    return {"checkpoint": str(checkpoint), "demo_song": demo, "test": {"tracks": len(rows), **summary},
            "test_tracks": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--baseline", type=Path, default=None, help="a second model scored the same way (e.g. the old one)")
    p.add_argument("--test-data", type=Path, required=True, help="synth root holding test/<track>/")
    p.add_argument("--out", type=Path, default=Path("eval.json"))
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    tracks = sorted(d for d in (args.test_data / "test").iterdir() if (d / "mixture.wav").is_file())
    if not tracks:
        raise FileNotFoundError(f"no tracks in {args.test_data / 'test'}; write them with bsmamba2 synth --test-tracks")
    report = {"model": evaluate(args.checkpoint, tracks, args.device)}
    if args.baseline is not None:
        report["baseline"] = evaluate(args.baseline, tracks, args.device)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, args.out)
    for name, r in report.items():
        d, t = r["demo_song"], r["test"]
        print(f"{name}: demo song uSDR {d['usdr']:.2f} dB, leakage {d['leakage_db']:.1f} dB; "
              f"{t['tracks']} test songs: uSDR {t['usdr']['mean']:.2f} dB (mean), "
              f"leakage {t['leakage_db']['mean']:.1f} dB (mean)")


if __name__ == "__main__":
    main()
