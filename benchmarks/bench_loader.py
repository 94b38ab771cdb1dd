"""Training-data loader throughput: random-mixing samples per second, alone (no model), for several worker counts.

Each sample is the paper's: four stems, each an 8-s stereo excerpt from a random salient window of a random track,
read with soundfile seek (no whole-file decoding), silenced with p=0.1, gained, summed. The benchmark builds a
MUSDB18-HQ-layout folder in a temp dir by tiling the shared sample track (`--sample-track`) to `--seconds` per track,
unless `--root` names an existing one. Files are read through the OS page cache (warm), so these are upper bounds of
what a cold disk gives; a paper training step consumes 5 samples per GPU per micro-batch.

    python benchmarks/bench_loader.py                         # workers 0,1,2 on this machine
    python benchmarks/bench_loader.py --root /data/musdb18hq --workers 0 4 8 16 --pin-memory
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
from torch.utils.data import DataLoader

from bsmamba2.data.mixing import StreamSampler, build_datasets
from bsmamba2.data.musdb import STEMS, load_musdb, read_excerpt
from bsmamba2.trainconfig import DataConfig

from common import SR, out_path, print_stamp, sample_track, write_json


def make_root(sample: Path, folder: Path, tracks: int, seconds: float) -> Path:
    """`tracks` songs of `seconds`, each the sample track tiled (circularly shifted per track) in MUSDB layout."""
    stems = {s: sf.read(str(sample / f"{s}.wav"), dtype="float32", always_2d=True)[0] for s in STEMS}
    n = int(seconds * SR)
    for i in range(tracks):
        out = folder / "train" / f"Tiled {i:02d}"
        out.mkdir(parents=True)
        for s, a in stems.items():
            tiled = np.tile(a, (n // len(a) + 2, 1))
            shift = (i * 7919) % len(a)
            sf.write(str(out / f"{s}.wav"), tiled[shift : shift + n], SR, subtype="PCM_16")
    return folder


def bench_workers(dataset, workers: int, batch: int, seconds: float, pin: bool) -> dict:
    loader = DataLoader(dataset, batch_size=batch, sampler=StreamSampler(batch), num_workers=workers,
                        pin_memory=pin, persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    it = iter(loader)
    next(it)  # start-up (worker spawn) excluded
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        mix, _ = next(it)
        n += mix.shape[0]
    elapsed = time.perf_counter() - t0
    del it, loader
    return {"workers": workers, "samples": n, "seconds": elapsed, "samples_per_s": n / elapsed,
            "audio_s_per_s": n * dataset.segment / SR / elapsed}


def bench_read(track_path: Path, segment: int, repeats: int = 20) -> dict:
    """One 8-s excerpt by seek vs decoding the whole file and slicing."""
    frames = sf.info(str(track_path)).frames
    rng = np.random.default_rng(0)
    starts = rng.integers(0, frames - segment, size=repeats)
    t0 = time.perf_counter()
    for s in starts:
        read_excerpt(track_path, int(s), segment)
    seek = (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    for s in starts[:5]:
        sf.read(str(track_path), dtype="float32")[int(s) : int(s) + segment]
    whole = (time.perf_counter() - t0) / 5
    return {"excerpt_seek_ms": 1e3 * seek, "whole_file_decode_ms": 1e3 * whole, "file_seconds": frames / SR}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, help="existing MUSDB18-HQ-layout root (default: build one in a temp dir)")
    ap.add_argument("--sample-track", type=Path, default=None,
                    help="a MUSDB18-HQ track folder to tile (default: the shared sample, $BSMAMBA2_SHARED)")
    ap.add_argument("--tracks", type=int, default=8)
    ap.add_argument("--track-seconds", type=float, default=180.0)
    ap.add_argument("--segment", type=float, default=8.0, help="excerpt seconds (paper: 8)")
    ap.add_argument("--batch", type=int, default=5)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--seconds", type=float, default=10.0, help="measuring time per worker count")
    ap.add_argument("--pin-memory", action="store_true")
    ap.add_argument("--out", default=None, help="JSON output (default $OUT/bench_loader.json when $OUT is set)")
    args = ap.parse_args(argv)
    meta = print_stamp("cpu")
    meta["device"] = f"{meta['device'].split(',')[0]}, {os.cpu_count()} cores"

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or make_root(args.sample_track or sample_track(), Path(tmp), args.tracks, args.track_seconds)
        cfg = DataConfig(root=str(root), segment_seconds=args.segment, valid_tracks=(), cache_dir=str(Path(tmp)))
        split = load_musdb(root, valid_tracks=())
        t0 = time.perf_counter()
        train, _ = build_datasets(split, cfg, ("vocals",), 2, seed=0, workers=0)
        activity_s = time.perf_counter() - t0
        result = {"root": str(root), "tracks": len(split.train), "segment_s": args.segment, "batch": args.batch,
                  "activity_detection_s": activity_s, "cpu_count": os.cpu_count(),
                  "read": bench_read(split.train[0].path("vocals"), train.segment), "loader": []}
        print(f"{len(split.train)} tracks, activity detection {activity_s:.2f} s; "
              f"8-s excerpt by seek {result['read']['excerpt_seek_ms']:.2f} ms vs whole-file decode "
              f"{result['read']['whole_file_decode_ms']:.1f} ms ({result['read']['file_seconds']:.0f}-s file)")
        for w in args.workers:
            r = bench_workers(train, w, args.batch, args.seconds, args.pin_memory)
            result["loader"].append(r)
            print(f"workers {w:2d}: {r['samples_per_s']:7.1f} samples/s ({r['audio_s_per_s']:.0f} audio-s/s)")
    write_json(out_path(args.out, "bench_loader.json"), {"meta": meta, **result})
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
