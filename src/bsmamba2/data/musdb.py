"""MUSDB18-HQ on disk: `ROOT/{train,test}/<track>/{mixture,vocals,drums,bass,other}.wav`.

The paper holds out 14 training tracks for validation, by name (nothing is moved). A `ROOT/valid/` folder, as some
copies of the dataset have, is accepted as the validation set instead. Excerpts are read with soundfile's seek, so a
training step never decodes a whole song.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from bsmamba2.trainconfig import PAPER_VALID_TRACKS

log = logging.getLogger(__name__)

STEMS: tuple[str, ...] = ("vocals", "drums", "bass", "other")


@dataclass(frozen=True)
class Track:
    """One song: its folder, its length in samples and the sample rate of its stems."""

    name: str
    folder: Path
    frames: int
    sample_rate: int
    channels: int

    def path(self, stem: str) -> Path:
        return self.folder / f"{stem}.wav"


def read_excerpt(path: str | Path, start: int, frames: int, channels: int = 2) -> np.ndarray:
    """Read `frames` samples from `start` without decoding the rest of the file.

    Args:
        path: a sound file soundfile can seek in (WAV, FLAC).
        start: first sample.
        frames: number of samples; past the end of the file the excerpt is zero-padded.
        channels: wanted channel count; mono files are repeated, extra channels are an error.
    Returns:
        (channels, frames) float32.
    """
    with sf.SoundFile(str(path)) as fh:
        if start > 0:
            fh.seek(min(start, fh.frames))
        data = fh.read(frames, dtype="float32", always_2d=True)  # (time, file_channels)
    data = data.T  # (file_channels, time)
    if data.shape[0] != channels:
        if data.shape[0] == 1:
            data = np.repeat(data, channels, axis=0)
        else:
            raise ValueError(f"{path} has {data.shape[0]} channels, expected {channels}")
    if data.shape[1] < frames:
        data = np.pad(data, ((0, 0), (0, frames - data.shape[1])))
    return np.ascontiguousarray(data)


def scan_tracks(folder: Path, stems: tuple[str, ...] = STEMS) -> list[Track]:
    """Every sub-folder of `folder` that holds all `stems` as .wav, sorted by name.

    Stems of one track must share sample rate and channel count; their length is the shortest stem's.
    """
    tracks = []
    if not folder.is_dir():
        return tracks
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        paths = [sub / f"{s}.wav" for s in stems]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            log.warning("skipping %s: missing %s", sub, ", ".join(missing))
            continue
        infos = [sf.info(str(p)) for p in paths]
        rates = {i.samplerate for i in infos}
        chans = {i.channels for i in infos}
        if len(rates) != 1 or len(chans) != 1:
            raise ValueError(f"{sub}: stems differ in sample rate {sorted(rates)} or channels {sorted(chans)}")
        tracks.append(Track(sub.name, sub, min(i.frames for i in infos), rates.pop(), chans.pop()))
    return tracks


@dataclass
class MUSDBSplit:
    """Training, validation and test tracks of one MUSDB18-HQ-layout root."""

    root: Path
    train: list[Track]
    valid: list[Track]
    test: list[Track]


def load_musdb(
    root: str | Path,
    stems: tuple[str, ...] = STEMS,
    valid_tracks: tuple[str, ...] | None = None,
    sample_rate: int | None = 44100,
) -> MUSDBSplit:
    """Find the tracks under `root` and split off validation.

    Args:
        root: folder with `train/` (and optionally `test/`, `valid/`).
        stems: stems every track must have.
        valid_tracks: names of `train/` tracks to hold out. None: `valid/` if it exists, else the paper's 14 tracks
            (whichever of them are present). An empty tuple: no validation.
        sample_rate: required sample rate of every track (None: any).
    Returns:
        MUSDBSplit with tracks sorted by name.
    """
    root = Path(root).expanduser()
    if not (root / "train").is_dir():
        raise FileNotFoundError(
            f"{root} has no train/ folder; point --data at a MUSDB18-HQ root (ROOT/train/<track>/vocals.wav, ...)"
        )
    train = scan_tracks(root / "train", stems)
    test = scan_tracks(root / "test", stems)
    valid_folder = scan_tracks(root / "valid", stems)
    if valid_tracks is None and valid_folder:
        valid = valid_folder
    else:
        names = set(PAPER_VALID_TRACKS if valid_tracks is None else valid_tracks)
        if valid_tracks is not None:
            known = {t.name for t in train} | {t.name for t in valid_folder}
            unknown = sorted(names - known)
            if unknown:
                raise ValueError(f"validation tracks not found under {root}/train: {unknown}")
        valid = [t for t in train if t.name in names] + [t for t in valid_folder if t.name in names]
        train = [t for t in train if t.name not in names]
    if not train:
        raise FileNotFoundError(f"no training tracks with stems {list(stems)} under {root}/train")
    if sample_rate is not None:
        wrong = [t.name for t in train + valid + test if t.sample_rate != sample_rate]
        if wrong:
            raise ValueError(f"tracks not at {sample_rate} Hz: {wrong[:5]}; resample them first")
    log.info("%s: %d training, %d validation, %d test tracks", root, len(train), len(valid), len(test))
    return MUSDBSplit(root, train, valid, test)
