"""Audio I/O: read, write, resample, and block-by-block streaming; waveforms are always `(channels, time)` float32.

Reading and writing go through libsndfile (`soundfile`), so every format it knows works (wav, flac, ogg, mp3, aiff…).
Resampling uses libsoxr (`soxr`) at its very-high-quality setting; its streaming form gives exactly the same samples as
resampling a whole signal at once, which keeps streamed separation equal to whole-file separation.

Errors about a file raise `AudioError` (a `ValueError`) whose message names the file and says what to do.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
import soxr
import torch

log = logging.getLogger(__name__)

RESAMPLE_QUALITY = "VHQ"

# File name endings searched when a folder is given; everything libsndfile decodes.
AUDIO_EXTENSIONS = (
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".snd", ".caf",
    ".w64", ".rf64", ".voc",
)  # fmt: skip

# Output containers we write, by file ending, and the sample formats of the lossless ones.
WRITE_FORMATS = {"wav": "WAV", "flac": "FLAC", "aiff": "AIFF", "mp3": "MP3", "ogg": "OGG"}
SUBTYPES = ("PCM_16", "PCM_24", "PCM_32", "FLOAT")
# The lossy containers' one sample format each (ogg: Vorbis at libsndfile's default quality).
LOSSY = {"MP3": "MPEG_LAYER_III", "OGG": "VORBIS"}
# mp3 is written as MPEG-1 Layer III at a constant bitrate: these bitrates (kbit/s) and sample rates.
MP3_BITRATES = (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
MP3_SAMPLE_RATES = (32000, 44100, 48000)
DEFAULT_MP3_BITRATE = 320


class AudioError(ValueError):
    """A problem with an audio file or waveform that the user can fix; the message says how."""


@dataclass(frozen=True)
class AudioInfo:
    """What libsndfile reports about a file before any sample is decoded."""

    path: Path
    sample_rate: int
    channels: int
    frames: int
    format: str
    subtype: str

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def _open_error(path: Path, err: Exception) -> AudioError:
    return AudioError(
        f"{path}: cannot decode audio ({err}); the file is corrupt or not in a format libsndfile reads "
        f"(wav, flac, ogg, mp3, aiff, …) — convert it, e.g. `ffmpeg -i '{path.name}' out.wav`"
    )


def _open(path: str | os.PathLike) -> sf.SoundFile:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise AudioError(f"{path}: is a folder, expected an audio file")
    try:
        return sf.SoundFile(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise _open_error(path, err) from None


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """Sample rate, channel count and length of an audio file, without decoding it."""
    with _open(path) as f:
        return AudioInfo(Path(path), f.samplerate, f.channels, f.frames, f.format, f.subtype)


def check_finite(wave: torch.Tensor, name: str, offset_s: float = 0.0, sample_rate: int | None = None) -> None:
    """Raise `AudioError` if `wave` (channels, time) holds NaN or Inf.

    `offset_s` is the time of the block's first sample, used with `sample_rate` to say where the first bad one is.
    """
    finite = torch.isfinite(wave)
    if bool(finite.all()):
        return
    where = offset_s
    if sample_rate and wave.ndim >= 1 and wave.shape[-1]:
        first = int((~finite).reshape(-1, wave.shape[-1]).any(dim=0).nonzero()[0, 0])
        where += first / sample_rate
    raise AudioError(
        f"{name}: contains NaN or Inf samples (first at {where:.3f} s); repair or re-export the audio before separating"
    )


def read_audio(
    path: str | os.PathLike, start: int = 0, frames: int = -1, check: bool = True
) -> tuple[torch.Tensor, int]:
    """Read a whole file (or `frames` samples from `start`).

    Returns:
        (wave (channels, time) float32 tensor, sample_rate). Mono files give one channel; nothing is guessed.
    Raises:
        FileNotFoundError if the file does not exist, AudioError if it cannot be decoded, is empty, or (with
        `check`) holds NaN/Inf samples.
    """
    path = Path(path)
    with _open(path) as f:
        sample_rate = f.samplerate
        try:
            if start:
                f.seek(start)
            data = f.read(frames, dtype="float32", always_2d=True)  # (time, channels)
        except (sf.LibsndfileError, RuntimeError) as err:
            raise _open_error(path, err) from None
    if start == 0 and frames != 0 and data.shape[0] == 0:
        raise AudioError(f"{path}: contains no audio samples; nothing to separate")
    wave = torch.from_numpy(np.ascontiguousarray(data.T))
    if check:
        check_finite(wave, str(path), start / sample_rate, sample_rate)
    return wave, sample_rate


class AudioReader:
    """Iterate over a file in blocks of `block_frames` samples, each a (channels, n) float32 tensor.

    Memory stays at one block whatever the file length. Empty files and NaN/Inf blocks raise `AudioError`.
    """

    def __init__(self, path: str | os.PathLike, block_frames: int = 441_000, check: bool = True):
        self.path = Path(path)
        self.block_frames = int(block_frames)
        self.check = check
        self._file = _open(self.path)
        self.info = AudioInfo(
            self.path, self._file.samplerate, self._file.channels, self._file.frames, self._file.format,
            self._file.subtype,
        )  # fmt: skip
        self.frames_read = 0

    @property
    def sample_rate(self) -> int:
        return self.info.sample_rate

    @property
    def channels(self) -> int:
        return self.info.channels

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            try:
                data = self._file.read(self.block_frames, dtype="float32", always_2d=True)  # (time, channels)
            except (sf.LibsndfileError, RuntimeError) as err:
                raise _open_error(self.path, err) from None
            if data.shape[0] == 0:
                break
            block = torch.from_numpy(np.ascontiguousarray(data.T))  # (channels, n)
            if self.check:
                check_finite(block, str(self.path), self.frames_read / self.sample_rate, self.sample_rate)
            self.frames_read += block.shape[-1]
            yield block
        if self.frames_read == 0:
            raise AudioError(f"{self.path}: contains no audio samples; nothing to separate")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "AudioReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _to_numpy(wave: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().to("cpu", torch.float32).numpy()
    return np.asarray(wave, dtype=np.float32)


def resolve_format(path: str | os.PathLike, format: str | None = None, subtype: str | None = None) -> tuple[str, str]:
    """(libsndfile format, subtype) for writing `path`: format from `format` or the file ending; subtype checked
    (PCM_16 by default; the lossy formats have their own and take none)."""
    ext = (format or Path(path).suffix.lstrip(".")).lower()
    if ext in ("aif",):
        ext = "aiff"
    if ext not in WRITE_FORMATS:
        raise ValueError(f"cannot write {ext!r} files; choose one of {sorted(WRITE_FORMATS)}")
    fmt = WRITE_FORMATS[ext]
    if fmt in LOSSY:
        if subtype is not None and subtype.upper() != LOSSY[fmt]:
            raise ValueError(f"{ext} is a lossy format: a sample format ({subtype}) applies to wav, flac and aiff only; "
                             "leave --subtype out")
        if not sf.check_format(fmt, LOSSY[fmt]):
            raise ValueError(f"this libsndfile ({sf.__libsndfile_version__}) cannot write {ext}; it needs libsndfile "
                             ">= 1.1 (`pip install -U soundfile`), or write flac")
        return fmt, LOSSY[fmt]
    subtype = (subtype or "PCM_16").upper()
    if subtype not in SUBTYPES or not sf.check_format(fmt, subtype):
        allowed = [s for s in SUBTYPES if sf.check_format(fmt, s)]
        raise ValueError(f"{ext} files cannot hold {subtype} samples; choose one of {allowed}")
    return fmt, subtype


def encoder_options(fmt: str, bitrate: int | None = None, sample_rate: int | None = None) -> dict:
    """`soundfile.SoundFile` keywords for libsndfile format `fmt` (from `resolve_format`), checking that a bitrate
    is only asked of mp3 and, when given, that mp3 can hold `sample_rate`. mp3: constant `bitrate` kbit/s (320 by
    default)."""
    if fmt != "MP3":
        if bitrate is not None:
            raise ValueError(f"a bitrate applies to mp3 output only, not {fmt.lower()}; leave --bitrate out")
        return {}
    if sample_rate is not None and int(sample_rate) not in MP3_SAMPLE_RATES:
        raise ValueError(f"mp3 holds 32, 44.1 or 48 kHz audio, not {sample_rate} Hz; pass --sample-rate 44100 (or "
                         "write flac)")
    kbps = DEFAULT_MP3_BITRATE if bitrate is None else int(bitrate)
    if kbps not in MP3_BITRATES:
        raise ValueError(f"mp3 bitrate {bitrate} kbit/s is not an MPEG-1 Layer III rate; choose one of "
                         f"{list(MP3_BITRATES)}")
    # libsndfile maps its compression level 0…1 linearly onto 320…32 kbit/s and takes the nearest MPEG bitrate;
    # level 1.0 itself is refused, and 0.99 lands on 32
    return dict(compression_level=min((320 - kbps) / (320 - 32), 0.99), bitrate_mode="CONSTANT")


class AudioWriter:
    """Write (channels, n) blocks to a temporary file next to `path`; `commit()` renames it into place.

    If the writer is closed without `commit()` (an error, Ctrl-C), the temporary file is deleted, so a partial output
    never appears under the final name. Integer subtypes and the lossy formats clip samples beyond ±1 and count them
    (`clipped`, `peak`); FLOAT keeps them. `bitrate`: mp3 only, kbit/s (`encoder_options`).
    """

    def __init__(
        self, path: str | os.PathLike, sample_rate: int, channels: int, subtype: str | None = None,
        format: str | None = None, bitrate: int | None = None,
    ):  # fmt: skip
        self.path = Path(path)
        self.format, self.subtype = resolve_format(self.path, format, subtype)
        options = encoder_options(self.format, bitrate, sample_rate)
        self.sample_rate = int(sample_rate)
        self.channels = int(channels)
        self.clipped = 0
        self.peak = 0.0
        self.frames = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A hidden name in the same folder, so the final rename is atomic; created by libsndfile with normal permissions.
        self._tmp = self.path.parent / f".{self.path.name}.{uuid.uuid4().hex[:8]}.part"
        try:
            self._file = sf.SoundFile(
                str(self._tmp), "w", samplerate=self.sample_rate, channels=self.channels, format=self.format,
                subtype=self.subtype, **options,
            )  # fmt: skip
        except Exception:
            self._tmp.unlink(missing_ok=True)
            raise

    @property
    def clips(self) -> bool:
        """Whether samples beyond ±1 are clipped: all but FLOAT (integers would wrap; lossy decoders clip anyway)."""
        return self.subtype != "FLOAT"

    def write(self, block: torch.Tensor | np.ndarray) -> None:
        """Append a (channels, n) block."""
        data = _to_numpy(block)
        if data.ndim != 2 or data.shape[0] != self.channels:
            raise ValueError(f"expected a ({self.channels}, time) block, got shape {tuple(data.shape)}")
        if data.shape[1] == 0:
            return
        peak = float(np.abs(data).max())
        self.peak = max(self.peak, peak)
        if self.clips and peak > 1.0:
            # libsndfile would wrap around on overflow; clip explicitly and count what was lost.
            self.clipped += int((np.abs(data) > 1.0).sum())
            data = np.clip(data, -1.0, 1.0)
        self._file.write(data.T)
        self.frames += data.shape[1]

    def commit(self) -> Path:
        """Close the file and move it to its final name; warn if samples were clipped."""
        self._file.close()
        os.replace(self._tmp, self.path)
        if self.clipped:
            total = max(1, self.frames * self.channels)
            log.warning(
                "%s: %d samples (%.3f%%) beyond ±1 clipped (peak %.3f); write %s--subtype FLOAT to keep them",
                self.path, self.clipped, 100.0 * self.clipped / total, self.peak,
                "wav or flac with " if self.format in LOSSY else "",
            )  # fmt: skip
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file (no output appears)."""
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "AudioWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._file.closed:
            self.commit()
        elif not self._file.closed or self._tmp.exists():
            self.abort()


def write_audio(
    path: str | os.PathLike, wave: torch.Tensor | np.ndarray, sample_rate: int, subtype: str | None = None,
    format: str | None = None, bitrate: int | None = None,
) -> Path:  # fmt: skip
    """Write a whole (channels, time) waveform atomically (temporary file, then rename).

    Args:
        path: output file; its ending picks the container (wav, flac, aiff, mp3, ogg) unless `format` is given.
        wave: (channels, time) float waveform.
        subtype: PCM_16 (default), PCM_24, PCM_32 or FLOAT, for wav, flac and aiff. Integer subtypes and the lossy
            formats clip beyond ±1 with a warning.
        bitrate: mp3 only: constant bitrate in kbit/s (default 320).
    Returns:
        the final path.
    """
    data = _to_numpy(wave)
    if data.ndim == 1:
        data = data[None]
    if data.ndim != 2:
        raise ValueError(f"write_audio expects a (channels, time) waveform, got shape {tuple(data.shape)}")
    writer = AudioWriter(path, sample_rate, data.shape[0], subtype=subtype, format=format, bitrate=bitrate)
    try:
        writer.write(data)
    except BaseException:
        writer.abort()
        raise
    return writer.commit()


def resample(wave: torch.Tensor | np.ndarray, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Resample a (channels, time) waveform with libsoxr (very high quality). Returns float32 (channels, time')."""
    data = _to_numpy(wave)
    if orig_sr == new_sr:
        return torch.from_numpy(data.copy())
    if data.shape[-1] == 0:
        return torch.zeros(data.shape[0], 0)
    out = soxr.resample(data.T, orig_sr, new_sr, quality=RESAMPLE_QUALITY)  # (time', channels)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(out, dtype=np.float32).reshape(-1, data.shape[0]).T))


class StreamResampler:
    """Resample (channels, n) blocks one after another; the concatenated output equals `resample` of the whole.

    With equal rates it passes blocks through unchanged.
    """

    def __init__(self, orig_sr: int, new_sr: int, channels: int):
        self.orig_sr, self.new_sr, self.channels = int(orig_sr), int(new_sr), int(channels)
        self._stream = (
            None if self.orig_sr == self.new_sr
            else soxr.ResampleStream(self.orig_sr, self.new_sr, self.channels, dtype="float32",
                                     quality=RESAMPLE_QUALITY)
        )  # fmt: skip

    def __call__(self, block: torch.Tensor, last: bool = False) -> torch.Tensor:
        if self._stream is None:
            return block
        data = np.ascontiguousarray(_to_numpy(block).T)  # (n, channels)
        out = self._stream.resample_chunk(data, last=last)
        return torch.from_numpy(np.ascontiguousarray(np.asarray(out, np.float32).reshape(-1, self.channels).T))

    def flush(self) -> torch.Tensor:
        return self(torch.zeros(self.channels, 0), last=True)


def resampled_length(frames: int, orig_sr: int, new_sr: int) -> int:
    """Length of `frames` samples at `orig_sr` once resampled to `new_sr` (what `resample` returns)."""
    if orig_sr == new_sr:
        return frames
    return int(math.floor(frames * new_sr / orig_sr + 0.5))


def downmix_to_stereo(wave: torch.Tensor) -> torch.Tensor:
    """Fold a (channels>2, time) waveform to stereo.

    Six channels are taken as 5.1 in WAV order (L R C LFE Ls Rs) and mixed with ITU-R BS.775 gains (LFE dropped);
    other counts average the even-numbered channels into left and the odd-numbered into right.
    """
    c = wave.shape[0]
    if c <= 2:
        return wave
    if c == 6:
        g = 1.0 / math.sqrt(2.0)
        left = wave[0] + g * wave[2] + g * wave[4]
        right = wave[1] + g * wave[2] + g * wave[5]
        return torch.stack([left, right]) / (1.0 + 2.0 * g)
    return torch.stack([wave[0::2].mean(dim=0), wave[1::2].mean(dim=0)])
