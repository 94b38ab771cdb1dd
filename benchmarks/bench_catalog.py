"""Catalog throughput: end-to-end audio-s/s of `bsmamba2.catalog` on a folder of songs against the model alone.

    # the issue's number, on one H100/H200 (target: end-to-end >= 90% of model-only): 64 songs of 3-4 minutes in
    # mixed formats (wav, flac at 48 kHz, ogg, mp3), paper-size model, bf16, default settings (8-s segments, 50%)
    python benchmarks/bench_catalog.py --songs 64 --device cuda --precision bf16 --check 2

    # CPU smoke run at tiny size
    python benchmarks/bench_catalog.py --songs 3 --minutes 0.3 0.4 --model tiny --device cpu --batch-size 2

In one run: (1) the model alone: `Separator.apply_on_device` on full batches already on the device, timed with
synchronisation, as input audio-s/s at the same overlap (each call advances batch x hop seconds of songs), before and
after the catalog run; (2) the I/O pipeline alone: the catalog with a pass-through model on a few songs (decode,
resample, blend, encode, write at full speed); (3) the catalog end to end (one process, the engine torchrun starts
per GPU), with its model busy fraction and per-stage times; (4) single-thread probes of decode per format and of
wav writing; (5) with --check N, N outputs compared with a plain `Separator.separate_file` run (bit identity).
Prints a human summary and one `RESULT {json}` line for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from common import device_label, make_model, music_like

FORMATS = (("wav", 44100), ("flac", 48000), ("ogg", 44100), ("mp3", 44100))  # format, sample rate, in turn


def _write_song(args: tuple[Path, int, float]) -> Path:
    from bsmamba2.audio import write_audio

    folder, index, seconds = args
    fmt, sr = FORMATS[index % len(FORMATS)]
    path = folder / f"song{index:03d}.{fmt}"
    if not path.exists():  # write_audio is atomic: a song is there whole or not at all
        write_audio(path, 0.5 * music_like(seconds, sr, seed=index), sr)
    return path


def make_library(folder: Path, songs: int, minutes: tuple[float, float], jobs: int) -> list[Path]:
    """`songs` stereo songs, lengths spread evenly over `minutes`, formats in turn; existing files are kept."""
    folder.mkdir(parents=True, exist_ok=True)
    lo, hi = minutes
    lengths = [60 * (lo + (hi - lo) * i / max(1, songs - 1)) for i in range(songs)]
    # one song per process: the synthesis is Python-heavy, and encoders run with the main thread's full stack
    with ProcessPoolExecutor(max(1, jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_write_song, [(folder, i, s) for i, s in enumerate(lengths)]))


def model_only(sep, calls: int, warmup: int = 3) -> dict:
    """Input audio-s/s of the model alone on full batches on the device (the same call shape as the catalog's)."""
    import torch

    x = (0.1 * torch.randn(sep.batch_size, 2, sep.segment_samples)).to(sep.device)
    sync = torch.cuda.synchronize if sep.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        sep.apply_on_device(x)
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        sep.apply_on_device(x)
    sync()
    per_call = (time.perf_counter() - start) / calls
    hop_s = sep.hop_samples / sep.sample_rate
    return {"s_per_call": round(per_call, 5), "audio_s_per_s": round(sep.batch_size * hop_s / per_call, 2)}


def run_catalog(sep, files: list[Path], out: Path, workers: int | None, fmt: str = "wav"):
    from bsmamba2 import catalog

    settings = sep.settings() | {"format": fmt, "template": "{track}/{stem}.{ext}"}
    options = catalog.Options(out_dir=out, settings=settings, template="{track}/{stem}.{ext}", format=fmt)
    start = time.perf_counter()
    report = catalog.separate_catalog(sep, files, options, catalog.join(), workers=workers, progress="none")
    return report, time.perf_counter() - start


def probes(files: list[Path], work: Path) -> dict:
    """Single-thread decode speed per format (audio-s/s) and PCM16 wav writing speed, on one song each."""
    import torch

    from bsmamba2.audio import AudioReader, AudioWriter

    out = {}
    seen = set()
    for path in files:
        ext = path.suffix.lstrip(".")
        if ext in seen:
            continue
        seen.add(ext)
        start = time.perf_counter()
        with AudioReader(path) as reader:
            frames = sum(b.shape[-1] for b in reader)
            sr = reader.sample_rate
        out[f"decode_{ext}_audio_s_per_s"] = round(frames / sr / (time.perf_counter() - start), 1)
    wave = 0.1 * torch.randn(2, 44100 * 60)
    start = time.perf_counter()
    with AudioWriter(work / "probe.wav", 44100, 2) as writer:
        for i in range(0, wave.shape[-1], 441000):
            writer.write(wave[:, i : i + 441000])
    out["write_wav_audio_s_per_s"] = round(60 / (time.perf_counter() - start), 1)
    (work / "probe.wav").unlink()
    return out


def check_identical(sep, files: list[Path], out: Path, work: Path) -> dict:
    """Compare catalog outputs with a plain `Separator.separate_file` of the same files: bytes and max difference."""
    import numpy as np
    import soundfile as sf

    plain = work / "plain"
    identical, max_diff = 0, 0.0
    for path in files:
        ref = sep.separate_file(path, plain)
        for stem, p in ref.items():
            got = out / path.stem / p.name
            if got.read_bytes() == p.read_bytes():
                identical += 1
            a, b = sf.read(str(got), dtype="int16")[0], sf.read(str(p), dtype="int16")[0]
            max_diff = max(max_diff, float(np.abs(a.astype(np.int32) - b.astype(np.int32)).max()))
    shutil.rmtree(plain, ignore_errors=True)
    return {"files": len(files), "outputs_identical": identical, "outputs": 2 * len(files),
            "max_diff_int16_lsb": max_diff}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--songs", type=int, default=64)
    p.add_argument("--minutes", type=float, nargs=2, default=(3.0, 4.0), metavar=("MIN", "MAX"))
    p.add_argument("--model", default="paper", help="paper (default), tiny, or a checkpoint path")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default=None, help="fp32 (default), bf16 or fp16")
    p.add_argument("--segment", type=float, default=8.0)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=None, help="default: 8 on a GPU, 1 on a CPU")
    p.add_argument("--workers", type=int, default=None, help="decode/write threads (default: the engine's)")
    p.add_argument("--model-calls", type=int, default=None, help="calls timed for the model alone (default 30/5)")
    p.add_argument("--probe-songs", type=int, default=4, help="songs for the pass-through (I/O alone) run")
    p.add_argument("--check", type=int, default=0, metavar="N", help="compare N outputs with a plain run")
    p.add_argument("--work", type=Path, default=None, help="folder for the library and outputs (default: a temp one)")
    p.add_argument("--keep", action="store_true", help="keep the outputs (the library is always kept in --work)")
    args = p.parse_args()
    # random weights clip in every output: keep the per-file warnings out of the benchmark's log
    logging.getLogger("bsmamba2").setLevel(logging.ERROR)

    import torch

    from bsmamba2.separate import Separator

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_catalog_"))
    t = time.perf_counter()
    files = make_library(work / "library", args.songs, tuple(args.minutes), os.cpu_count() or 1)
    gen_s = time.perf_counter() - t
    sep = Separator(make_model(args.model), device=args.device, precision=args.precision, segment=args.segment,
                    overlap=args.overlap, batch_size=args.batch_size)  # fmt: skip
    calls = args.model_calls or (30 if sep.device.type == "cuda" else 5)
    # the model alone runs what the catalog will run: on a CPU, compiled for a library this long (the warm-up compiles)
    sep.plan_compile(len(files) * 30 * sum(args.minutes))  # seconds: songs x mean length

    before = model_only(sep, calls)
    passthrough = Separator(make_model("passthrough"), device=sep.device, segment=args.segment, overlap=args.overlap,
                            batch_size=sep.batch_size)  # fmt: skip
    io_report, io_wall = run_catalog(passthrough, files[: args.probe_songs], work / "out_io", args.workers)
    shutil.rmtree(work / "out_io", ignore_errors=True)
    report, wall = run_catalog(sep, files, work / "out", args.workers)
    after = model_only(sep, calls)
    stage = probes(files, work)
    check = check_identical(sep, files[: args.check], work / "out", work) if args.check else None
    if not args.keep:
        shutil.rmtree(work / "out", ignore_errors=True)

    rank = report.ranks[0]
    e2e = report.audio_s / wall
    best_model = max(before["audio_s_per_s"], after["audio_s_per_s"])
    result = {
        "bench": "catalog", "model": args.model, "params": sum(q.numel() for q in sep.model.parameters()),
        "device": device_label(sep.device), "precision": str(sep.dtype).replace("torch.", ""),
        "segment_s": sep.segment, "overlap": sep.overlap, "batch_size": sep.batch_size, "workers": rank["workers"],
        "songs": len(files), "audio_s": round(report.audio_s, 1), "ok": report.ok, "failed": report.failed,
        "wall_s": round(wall, 2), "e2e_audio_s_per_s": round(e2e, 2),
        "model_only_audio_s_per_s": {"before": before["audio_s_per_s"], "after": after["audio_s_per_s"]},
        "e2e_over_model_only": round(e2e / best_model, 4), "busy": round(report.busy, 4),
        "stages_s": {
            "model (GPU time of the calls)": round(rank["model_s"], 2), "model starved": round(rank["starved_s"], 2),
            "workers: decode+resample+blend+encode+write (sum over threads)": round(rank["worker_io_s"], 2),
            "workers: waiting for the model (sum)": round(rank["worker_wait_s"], 2),
            "hashing inputs and outputs (sum)": round(rank["hash_s"], 2),
            "plan + merge (wall minus the process's work)": round(wall - rank["wall_s"], 2),
        },
        "calls": rank["calls"], "rows": rank["rows"], "pad_rows": rank["pad_rows"],
        "io_only_audio_s_per_s": round(io_report.audio_s / io_wall, 1), "io_only_songs": io_report.ok,
        "probes": stage, "library_generation_s": round(gen_s, 1), "check": check,
        "torch": torch.__version__,
    }  # fmt: skip
    print(f"{args.model} on {result['device']}, {result['precision']}, segment {sep.segment} s overlap {sep.overlap} "
          f"batch {sep.batch_size}, {rank['workers']} workers: {len(files)} songs, {report.audio_s / 3600:.2f} h in "
          f"{wall:.1f} s -> {e2e:.1f} audio-s/s end to end; model alone {before['audio_s_per_s']:.1f} / "
          f"{after['audio_s_per_s']:.1f} audio-s/s (before/after) -> {100 * e2e / best_model:.1f}% of model-only; "
          f"model busy {100 * report.busy:.1f}%; I/O pipeline alone {result['io_only_audio_s_per_s']} audio-s/s")
    for name, value in result["stages_s"].items():
        print(f"  {name}: {value} s")
    print(f"  probes (one thread): {stage}")
    if check:
        print(f"  check: {check['outputs_identical']}/{check['outputs']} outputs byte-identical to a plain run, "
              f"max difference {check['max_diff_int16_lsb']:.0f} LSB (int16)")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
