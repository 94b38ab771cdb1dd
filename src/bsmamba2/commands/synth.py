"""`bsmamba2 synth`: write procedurally generated songs in the MUSDB18-HQ layout.

ROOT/{train,valid,test}/<track>/{mixture,vocals,drums,bass,other}.wav (stereo, 44.1 kHz) plus
ROOT/{train,valid,test}/<track>/vocal_regions.json (the sung phrases, in seconds, and what was drawn), and
ROOT/synth.json (the arguments). Track i of a split is `generate_song((seed, split, i))`, so a folder can be regenerated or extended
bit for bit. With PCM_16 files the stems are quantized first and the mixture is their integer sum, so the stems on
disk add up to the mixture exactly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from bsmamba2.data.synth import BASS_KINDS, MODES, REGIONS_FILENAME, SAMPLE_RATE, STEMS, VOICE_TYPES, generate_song

HELP = "synthesize songs with controllable vocal density in the MUSDB18-HQ layout"
SPLITS = {"train": 0, "test": 1, "valid": 2}
SUBTYPES = ("PCM_16", "FLOAT")

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="dataset root to write (created if missing)")
    parser.add_argument("--tracks", type=int, default=10, help="training tracks (default 10)")
    parser.add_argument("--valid-tracks", type=int, default=0,
                        help="validation tracks in ROOT/valid/, which training picks up (default 0)")
    parser.add_argument("--test-tracks", type=int, default=0, help="test tracks (default 0)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each song (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    parser.add_argument("--vocal-activity", choices=MODES, default="mixed",
                        help="sparse: 0.5-2 s phrases, long gaps; dense: long phrases, short gaps; mixed: both; "
                        "none: no vocals; varied: per song one of those, a wide vocal level, reverb and a "
                        "hard-negative lead in the singing range (a training mix)")
    parser.add_argument("--test-activity", choices=MODES, default=None,
                        help="vocal activity of the test split (default: as --vocal-activity)")
    parser.add_argument("--valid-activity", choices=MODES, default=None,
                        help="vocal activity of the validation split (default: as --vocal-activity)")
    parser.add_argument("--voice", choices=tuple(VOICE_TYPES), default=None,
                        help="every song sung by this voice type instead of a drawn one; the same seed keeps its "
                        "phrases and accompaniment, so test sets that differ only in the voice can be compared")
    parser.add_argument("--bass-kind", choices=BASS_KINDS, default=None,
                        help="every song's bass in this timbre instead of a drawn one (same notes, the rest kept)")
    parser.add_argument("--sample-rate", type=int, default=SAMPLE_RATE, help="Hz (default 44100)")
    parser.add_argument("--subtype", choices=SUBTYPES, default="PCM_16", help="WAV sample format (default PCM_16)")
    parser.add_argument("--workers", type=int, default=1, help="processes generating in parallel (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace tracks that already exist")


def track_name(seed: int, index: int) -> str:
    return f"synth-{seed}-{index:04d}"


def _job_settings(args: argparse.Namespace, split: str) -> dict:
    activity = {"test": args.test_activity, "valid": getattr(args, "valid_activity", None)}.get(split)
    activity = activity or args.vocal_activity
    # forced_*: None when drawn (also for tracks written before these settings existed, which lack the keys), so a
    # track made with a forced choice is not kept for a request without it, nor the other way round
    return {"seconds": float(args.seconds), "vocal_activity": activity, "sample_rate": int(args.sample_rate),
            "subtype": args.subtype, "forced_voice": getattr(args, "voice", None),
            "forced_bass": getattr(args, "bass_kind", None)}


def _existing_matches(folder: Path, song_seed: list[int], settings: dict) -> bool:
    meta_path = folder / REGIONS_FILENAME
    if not meta_path.is_file() or not all((folder / f"{s}.wav").is_file() for s in ("mixture",) + STEMS):
        return False
    with open(meta_path) as fh:
        meta = json.load(fh)
    return meta.get("seed") == song_seed and all(meta.get(k) == v for k, v in settings.items())


def write_track(folder: Path, song_seed: list[int], settings: dict) -> dict:
    """Generate one song and write it to `folder` atomically (temp folder, then rename). Returns its metadata."""
    song = generate_song(song_seed, settings["seconds"], settings["vocal_activity"], settings["sample_rate"],
                         bass_kind=settings["forced_bass"], voice=settings["forced_voice"])
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        if settings["subtype"] == "PCM_16":
            # Quantize the stems, then sum the integers: the files add up exactly.
            ints = {k: np.round(song.stems[k].T * 32768.0).astype(np.int32) for k in STEMS}  # (time, channels)
            ints["mixture"] = sum(ints[k] for k in STEMS)
            for name, data in ints.items():
                if np.abs(data).max(initial=0) > 32767:
                    raise RuntimeError(f"{name} of seed {song_seed} clips; this is a bug in the generator")
                sf.write(tmp / f"{name}.wav", data.astype(np.int16), song.sample_rate, subtype="PCM_16")
        else:
            for name in ("mixture",) + STEMS:
                data = song.mixture if name == "mixture" else song.stems[name]
                sf.write(tmp / f"{name}.wav", data.T, song.sample_rate, subtype="FLOAT")
        meta = {
            **song.info,
            **settings,
            "frames": int(song.mixture.shape[-1]),
            "vocal_regions": [[s, e] for s, e in song.vocal_regions],
        }
        with open(tmp / REGIONS_FILENAME, "w") as fh:
            json.dump(meta, fh, indent=1)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _write_job(job: tuple[str, list[int], dict]) -> str:
    folder, song_seed, settings = job
    write_track(Path(folder), song_seed, settings)
    return folder


def run(args: argparse.Namespace) -> int:
    counts = {"train": args.tracks, "valid": args.valid_tracks, "test": args.test_tracks}
    if min(counts.values()) < 0 or sum(counts.values()) == 0:
        raise ValueError("ask for at least one track: --tracks, --valid-tracks and --test-tracks take counts >= 0")
    if args.seconds < 1.0:
        raise ValueError(f"--seconds must be at least 1, got {args.seconds}")
    if args.sample_rate < 16000:
        raise ValueError(f"--sample-rate must be at least 16000, got {args.sample_rate}")
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    root: Path = args.out
    jobs, kept = [], 0
    for split, count in counts.items():
        settings = _job_settings(args, split)
        if count:
            (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            folder = root / split / track_name(args.seed, i)
            song_seed = [int(args.seed), SPLITS[split], i]
            if folder.exists() and not args.overwrite:
                if _existing_matches(folder, song_seed, settings):
                    kept += 1
                    continue
                raise ValueError(f"{folder} exists with other settings; pass --overwrite or choose another --out")
            jobs.append((str(folder), song_seed, settings))
    if kept:
        log.info("kept %d existing tracks with the same settings", kept)
    with tqdm(total=len(jobs), unit="track", desc="synth") as bar:
        if args.workers == 1 or len(jobs) <= 1:
            for job in jobs:
                _write_job(job)
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=args.workers) as pool:
                for _ in pool.map(_write_job, jobs):
                    bar.update()
    manifest = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if not k.startswith("_") and k not in ("command", "verbose")}
    tmp = root / ".synth.json.tmp"
    with open(tmp, "w") as fh:
        json.dump(manifest, fh, indent=1)
    os.replace(tmp, root / "synth.json")
    log.info("wrote %d tracks (%.0f s of audio) to %s", len(jobs), len(jobs) * args.seconds, root)
    return 0
