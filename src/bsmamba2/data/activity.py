"""Source-activity (salience) detection, as the paper uses it to pick training excerpts.

Per stem file: windows of `segment` samples with 50 % overlap are each split into 10 chunks; a window is salient
when more than half of its chunks have an RMS above the 0.15 quantile of that window's chunk RMS, floored at 1e-3,
in every channel. In practice the floor decides: a window is kept when most of it is louder than -60 dBFS.

Detection reads every stem once, so the result is cached as JSON in a cache folder under a name that is the hash of
its inputs (file names, sizes, modification times, window length and the detection settings): change any of them
and it is recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from bsmamba2.data.musdb import Track
from bsmamba2.trainconfig import SalienceConfig

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def salient_starts(audio: np.ndarray, segment: int, cfg: SalienceConfig = SalienceConfig()) -> np.ndarray:
    """Start samples of the salient windows of one stem.

    Args:
        audio: (channels, time) float.
        segment: window length in samples.
        cfg: detection settings.
    Returns:
        (n,) int64 start samples, ascending; empty when the file is shorter than one window.
    """
    channels, length = audio.shape
    hop = max(1, int(round(segment * (1.0 - cfg.overlap))))
    if length < segment:
        return np.zeros(0, dtype=np.int64)
    starts = np.arange(0, length - segment + 1, hop, dtype=np.int64)  # (windows,)
    chunk = segment // cfg.n_chunks
    # Chunk mean squares from a float64 running sum, so any hop/chunk ratio costs one pass over the audio.
    csum = np.zeros((channels, length + 1), dtype=np.float64)
    np.cumsum(np.square(audio, dtype=np.float64), axis=1, out=csum[:, 1:])
    chunk_starts = starts[:, None] + chunk * np.arange(cfg.n_chunks)[None, :]  # (windows, chunks)
    energy = csum[:, chunk_starts + chunk] - csum[:, chunk_starts]  # (channels, windows, chunks)
    rms = np.sqrt(np.maximum(energy, 0.0) / chunk)
    rms[rms == 0.0] = cfg.eps
    threshold = np.quantile(rms, cfg.quantile, axis=-1, keepdims=True)  # (channels, windows, 1)
    threshold = np.maximum(threshold, cfg.rms_floor)
    active = (rms > threshold).mean(axis=-1)  # (channels, windows)
    keep = np.all(active > cfg.min_active_fraction, axis=0)  # (windows,)
    return starts[keep]


def _detect_file(args: tuple[str, int, SalienceConfig]) -> list[int]:
    path, segment, cfg = args
    audio, _ = sf.read(path, dtype="float32", always_2d=True)  # (time, channels)
    return salient_starts(audio.T, segment, cfg).tolist()


def _fingerprint(tracks: list[Track], stems: tuple[str, ...], segment: int, cfg: SalienceConfig) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": CACHE_VERSION, "segment": segment, "cfg": dataclasses.asdict(cfg)}).encode())
    for track in tracks:
        for stem in stems:
            st = os.stat(track.path(stem))
            h.update(f"{track.name}/{stem}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def default_cache_dir(root: Path) -> Path:
    """ROOT/.bsmamba2-cache when writable, else ~/.cache/bsmamba2 (datasets often live on read-only storage)."""
    local = root / ".bsmamba2-cache"
    try:
        local.mkdir(exist_ok=True)
        if os.access(local, os.W_OK):
            return local
    except OSError:
        pass
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bsmamba2"
    home.mkdir(parents=True, exist_ok=True)
    return home


def detect_activity(
    tracks: list[Track],
    stems: tuple[str, ...],
    segment: int,
    cfg: SalienceConfig = SalienceConfig(),
    cache_dir: str | Path | None = None,
    workers: int = 0,
) -> dict[str, dict[str, list[int]]]:
    """Salient window starts for every track and stem, from cache when the inputs are unchanged.

    Args:
        tracks: the tracks to analyse.
        stems: stem names.
        segment: window length in samples (the training excerpt length).
        cfg: detection settings.
        cache_dir: folder for the JSON cache; None disables caching.
        workers: processes for detection (0: in this process).
    Returns:
        {track name: {stem: [start sample, ...]}}.
    """
    cache_file = None
    if cache_dir is not None:
        key = _fingerprint(tracks, stems, segment, cfg)
        cache_file = Path(cache_dir) / f"activity-{key}.json"
        if cache_file.is_file():
            with open(cache_file, encoding="utf-8") as fh:
                cached = json.load(fh)
            if cached.get("key") == key:
                log.debug("activity from cache %s", cache_file)
                return cached["starts"]
    jobs = [(str(t.path(s)), segment, cfg) for t in tracks for s in stems]
    desc = f"source activity ({len(tracks)} tracks)"
    if workers > 0 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(tqdm(pool.map(_detect_file, jobs, chunksize=4), total=len(jobs), desc=desc, leave=False))
    else:
        results = [_detect_file(job) for job in tqdm(jobs, desc=desc, leave=False, disable=len(jobs) < 8)]
    starts: dict[str, dict[str, list[int]]] = {t.name: {} for t in tracks}
    it = iter(results)
    for t in tracks:
        for s in stems:
            starts[t.name][s] = next(it)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=".activity-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"key": key, "segment": segment, "stems": list(stems), "starts": starts}, fh)
        os.replace(tmp, cache_file)
        log.info("source activity cached in %s", cache_file)
    return starts
