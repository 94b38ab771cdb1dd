"""Audio I/O: read, write, resample, and block-by-block streaming; waveforms are always `(channels, time)` float32.

Two decoders sit behind one interface (`audio_info`, `read_audio`, `AudioReader`): libsndfile (`soundfile`) for what it
reads (wav, flac, aiff, ogg/vorbis, mp3…), and FFmpeg's libraries through PyAV (`av`, whose wheels carry them, so no
system ffmpeg is needed) for everything else: m4a/aac/alac, opus in ogg or webm, wma, and the first audio stream of
video files (mp4, mkv, mov, webm, avi). Both decode block by block, so memory does not grow with the file's length.
Writing goes through libsndfile (wav, flac, aiff, mp3, ogg) or PyAV (m4a as AAC, opus as Opus in Ogg).
Resampling uses libsoxr (`soxr`) at its very-high-quality setting; its streaming form gives exactly the same samples as
resampling a whole signal at once, which keeps streamed separation equal to whole-file separation.

Errors about a file raise `AudioError` (a `ValueError`) whose message names the file and says what to do.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from fractions import Fraction

import numpy as np
import soundfile as sf
import soxr
import torch

log = logging.getLogger(__name__)

RESAMPLE_QUALITY = "VHQ"

# File name endings searched when a folder is given: what libsndfile decodes, then what FFmpeg (PyAV) decodes,
# video containers included (their first audio stream is separated).
AUDIO_EXTENSIONS = (
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".snd", ".caf",
    ".w64", ".rf64", ".voc",
    ".m4a", ".m4b", ".aac", ".alac", ".wma", ".asf", ".webm", ".weba", ".mka", ".mkv", ".mp4", ".m4v", ".mov",
    ".avi", ".ac3", ".eac3", ".dts", ".wv", ".ape", ".tta", ".mpc", ".mp2", ".amr", ".3gp",
)  # fmt: skip

# Output containers we write, by file ending, and the sample formats of the lossless ones.
WRITE_FORMATS = {"wav": "WAV", "flac": "FLAC", "aiff": "AIFF", "mp3": "MP3", "ogg": "OGG", "m4a": "M4A",
                 "opus": "OPUS"}  # fmt: skip
SUBTYPES = ("PCM_16", "PCM_24", "PCM_32", "FLOAT")
# The default sample format of a lossless output: the input's depth (`subtype_for`).
INPUT_SUBTYPE = "INPUT"
# The lossy containers' one sample format each (ogg: Vorbis at libsndfile's default quality).
LOSSY = {"MP3": "MPEG_LAYER_III", "OGG": "VORBIS", "M4A": "AAC", "OPUS": "OPUS"}
# Written through PyAV (FFmpeg's encoders): format -> (FFmpeg muxer, encoder, encoder sample format).
AV_WRITE = {"M4A": ("ipod", "aac", "fltp"), "OPUS": ("opus", "libopus", "flt")}
# mp3 is written as MPEG-1 Layer III at a constant bitrate: these bitrates (kbit/s) and sample rates.
MP3_BITRATES = (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
MP3_SAMPLE_RATES = (32000, 44100, 48000)
DEFAULT_MP3_BITRATE = 320
# Default bitrates (kbit/s) of the lossy formats that take one, and the range each encoder accepts.
DEFAULT_BITRATES = {"MP3": DEFAULT_MP3_BITRATE, "M4A": 256, "OPUS": 160}
BITRATE_RANGES = {"M4A": (16, 512), "OPUS": (6, 510)}
# The sampling rates AAC can hold; Opus always runs at 48 kHz (other rates are resampled on writing).
AAC_SAMPLE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)
OPUS_SAMPLE_RATE = 48000


class AudioError(ValueError):
    """A problem with an audio file or waveform that the user can fix; the message says how."""


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says before any sample is decoded.

    `frames` is exact for libsndfile formats; for files decoded through FFmpeg it is the container's estimate
    (`frames_exact` False): the exact count, after the encoder's priming and padding are dropped, is known once the
    file has been decoded (`AudioReader.frames_read`, or the length `read_audio` returns).
    """

    path: Path
    sample_rate: int
    channels: int
    frames: int
    format: str
    subtype: str
    frames_exact: bool = True

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def _open_error(path: Path, err: Exception) -> AudioError:
    return AudioError(
        f"{path}: cannot decode audio ({' '.join(str(err).split()) or type(err).__name__}); the file is corrupt or "
        f"not an audio or video file that libsndfile or FFmpeg reads (wav, flac, mp3, ogg, opus, m4a, wma, mp4, mkv, "
        f"webm, …) — check that it plays, or re-export it"
    )


class _SoundFileSource:
    """libsndfile decoding: (channels, n) float32 blocks from a `soundfile.SoundFile`."""

    def __init__(self, path: Path, handle: sf.SoundFile):
        self.path, self._file = path, handle
        self.info = AudioInfo(path, handle.samplerate, handle.channels, handle.frames, handle.format, handle.subtype)

    def read(self, frames: int) -> np.ndarray:
        try:
            data = self._file.read(frames, dtype="float32", always_2d=True)  # (time, channels)
        except (sf.LibsndfileError, RuntimeError) as err:
            raise _open_error(self.path, err) from None
        return np.ascontiguousarray(data.T)

    def seek(self, frame: int) -> None:
        if frame:
            self._file.seek(frame)

    def close(self) -> None:
        self._file.close()


# PyAV sample formats (without the planar "p") -> (numpy dtype, scale to ±1 float, offset); what libsndfile does too.
_AV_SAMPLE_FORMATS = {
    "flt": (np.float32, 1.0, 0.0), "dbl": (np.float64, 1.0, 0.0), "s16": (np.int16, 1.0 / 32768, 0.0),
    "s32": (np.int32, 1.0 / 2147483648, 0.0), "s64": (np.int64, 1.0 / 9223372036854775808, 0.0),
    "u8": (np.uint8, 1.0 / 128, -128.0),
}  # fmt: skip


def _frame_to_float(frame) -> np.ndarray:
    """A decoded `av.AudioFrame` as a (channels, n) float32 array, integers scaled to ±1 like libsndfile does."""
    name = frame.format.name
    planar = name.endswith("p")
    base = name[:-1] if planar else name
    if base not in _AV_SAMPLE_FORMATS:
        raise AudioError(f"decoded audio in sample format {name!r}, which bsmamba2 cannot convert; re-export the file")
    _, scale, offset = _AV_SAMPLE_FORMATS[base]
    channels = frame.layout.nb_channels
    data = frame.to_ndarray()  # planar: (channels, n); packed: (1, n·channels) interleaved
    if not planar:
        data = data.reshape(-1, channels).T
    if base in ("flt",):
        return np.ascontiguousarray(data, dtype=np.float32)
    out = data.astype(np.float64)
    if offset:
        out += offset
    if scale != 1.0:
        out *= scale
    return np.ascontiguousarray(out, dtype=np.float32)


class _AVSource:
    """FFmpeg decoding through PyAV: the first audio stream of any container, as (channels, n) float32 blocks.

    Packets are demuxed and decoded one at a time, so memory holds a few frames whatever the file's length. FFmpeg's
    decoders drop the encoder's priming samples (skip-samples, edit lists, Opus pre-skip); trailing padding is
    dropped where the container's sample-accurate timeline says the stream ends earlier than the last decoded frame
    (AAC in mp4/m4a): decoded samples past the end of the last packet (its pts + duration) are not audio.
    """

    def __init__(self, path: Path):
        import av  # noqa: PLC0415 - FFmpeg's libraries load only when a file needs them

        self._av = av
        self.path = path
        try:
            self._container = av.open(str(path), metadata_errors="ignore")
        except (av.FFmpegError, UnicodeDecodeError) as err:
            raise _open_error(path, err) from None
        try:
            streams = self._container.streams.audio
            if not streams:
                kinds = sorted({s.type for s in self._container.streams}) or ["none"]
                raise AudioError(
                    f"{path}: has no audio stream (streams: {', '.join(kinds)}); nothing to separate — "
                    "pick the file that holds the sound track"
                )
            self._stream = streams[0]
            self._rate = self._channels = 0
            tb = self._stream.time_base
            self._packets = self._container.demux(self._stream)
            self._pending: list[np.ndarray] = []  # decoded (channels, n) arrays not yet returned
            self._pending_frames = 0
            self._held: list[tuple[int | None, np.ndarray]] = []  # frames that may reach past the stream's end
            self._end_ts: int | None = None  # max(pts + duration) over the packets so far, in time_base units
            self._eof = False
            self._decode_errors = 0
            self._position = 0
            self._tb = Fraction(tb) if tb is not None else None
            self._trim = False
            # Decode up to the first samples: the rate and channel count of decoded frames are the truth (HE-AAC's
            # header, say, gives the core rate, half the decoded one).
            while not self._pending_frames and not self._held and not self._eof:
                self._next_frames()
            rate = self._rate or self._stream.codec_context.sample_rate
            channels = self._channels or self._stream.codec_context.channels
            if self._stream.duration is not None and tb is not None:
                estimate = int(round(self._stream.duration * Fraction(tb) * rate))
            elif self._container.duration is not None:
                estimate = int(round(self._container.duration * rate / 1_000_000))
            else:
                estimate = self._pending_frames
            codec = self._stream.codec_context.name.upper()
            self.info = AudioInfo(path, int(rate), int(channels), max(estimate, 0),
                                  self._container.format.name.split(",")[0].upper(), codec, frames_exact=False)
        except BaseException:
            self._container.close()
            raise

    def _next_frames(self):
        """Demux and decode one packet; decoded frames go to `_held`/`_pending`. Returns None at the end."""
        av = self._av
        if self._eof:
            return None
        try:
            packet = next(self._packets)
        except StopIteration:
            self._finish()
            return None
        except av.FFmpegError as err:
            raise _open_error(self.path, err) from None
        if packet.pts is not None and packet.duration:
            end = packet.pts + packet.duration
            self._end_ts = end if self._end_ts is None else max(self._end_ts, end)
        try:
            frames = packet.decode()
        except (av.InvalidDataError, av.error.PatchWelcomeError) as err:
            # FFmpeg skips a damaged packet and goes on, as a player does; we say so once at the end.
            self._decode_errors += 1
            log.debug("%s: skipping a packet FFmpeg cannot decode (%s)", self.path, err)
            frames = []
        except av.FFmpegError as err:
            raise _open_error(self.path, err) from None
        for frame in frames:
            self._add(frame)
        if packet.size == 0 and packet.pts is None and packet.dts is None:  # the flush packet: decoder drained
            self._finish()
        return True

    def _add(self, frame) -> None:
        rate, channels = frame.sample_rate, frame.layout.nb_channels
        if not self._rate:
            self._rate, self._channels = rate, channels
            # Timestamps finer than one sample allow sample-exact end trimming; coarser ones (webm's 1 ms) do not,
            # and there the decoder's own discard-padding applies.
            self._trim = self._tb is not None and rate > 0 and self._tb <= Fraction(1, rate)
        elif (rate, channels) != (self._rate, self._channels):
            raise AudioError(
                f"{self.path}: the audio changes from {self._channels} channel(s) at {self._rate} Hz to {channels} at "
                f"{rate} Hz partway through; convert it to one format first (e.g. re-export as flac)"
            )
        data = _frame_to_float(frame)
        self._held.append((frame.pts, data))
        self._release(final=False)

    def _release(self, final: bool) -> None:
        """Move held frames to `_pending`, trimming samples past the end of the stream's packets."""
        while self._held:
            pts, data = self._held[0]
            if self._trim and pts is not None and self._end_ts is not None:
                # sample positions of this frame on the stream's timeline, time_base -> samples
                start = pts * self._tb * self._rate
                end = self._end_ts * self._tb * self._rate
                if start + data.shape[1] > end:
                    if not final:
                        return  # more packets may extend the end; wait
                    keep = max(0, int(end - start))
                    if keep < data.shape[1]:
                        log.debug("%s: dropping %d samples of encoder padding", self.path, data.shape[1] - keep)
                    data = data[:, :keep]
            self._held.pop(0)
            if data.shape[1]:
                self._pending.append(data)
                self._pending_frames += data.shape[1]

    def _finish(self) -> None:
        if not self._eof:
            self._eof = True
            self._release(final=True)
            if self._decode_errors:
                log.warning("%s: %d damaged packet(s) skipped while decoding", self.path, self._decode_errors)

    def read(self, frames: int) -> np.ndarray:
        """Up to `frames` samples (all the rest with -1), as (channels, n) float32."""
        while (frames < 0 or self._pending_frames < frames) and not self._eof:
            self._next_frames()
        n = self._pending_frames if frames < 0 else min(frames, self._pending_frames)
        out, got = [], 0
        while got < n:
            block = self._pending[0]
            take = min(n - got, block.shape[1])
            out.append(block[:, :take])
            if take == block.shape[1]:
                self._pending.pop(0)
            else:
                self._pending[0] = block[:, take:]
            got += take
        self._pending_frames -= n
        self._position += n
        if not out:
            return np.zeros((self.info.channels, 0), np.float32)
        return np.ascontiguousarray(np.concatenate(out, axis=1)) if len(out) > 1 else np.ascontiguousarray(out[0])

    def seek(self, frame: int) -> None:
        """Skip to sample `frame` by decoding and discarding: compressed streams seek only to packet boundaries, and
        this keeps positions exact."""
        while self._position < frame:
            if not self.read(min(frame - self._position, 1 << 20)).shape[1]:
                break

    def close(self) -> None:
        self._container.close()


def _open(path: str | os.PathLike):
    """A decoder for `path`: libsndfile when it reads the file, else FFmpeg (PyAV)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise AudioError(f"{path}: is a folder, expected an audio file")
    try:
        return _SoundFileSource(path, sf.SoundFile(str(path)))
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        log.debug("%s: libsndfile cannot read it (%s); trying FFmpeg", path, err)
    return _AVSource(path)


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """Sample rate, channel count and length of an audio file, without decoding it (see `AudioInfo.frames_exact`)."""
    source = _open(path)
    try:
        return source.info
    finally:
        source.close()


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
        Compressed files have FFmpeg's decoded length, the encoder's priming and padding dropped.
    Raises:
        FileNotFoundError if the file does not exist, AudioError if it cannot be decoded, has no audio stream, is
        empty, or (with `check`) holds NaN/Inf samples.
    """
    path = Path(path)
    source = _open(path)
    try:
        sample_rate = source.info.sample_rate
        source.seek(start)
        data = source.read(frames)  # (channels, time)
    finally:
        source.close()
    if start == 0 and frames != 0 and data.shape[1] == 0:
        raise AudioError(f"{path}: contains no audio samples; nothing to separate")
    wave = torch.from_numpy(data)
    if check:
        check_finite(wave, str(path), start / sample_rate, sample_rate)
    return wave, sample_rate


class AudioReader:
    """Iterate over a file in blocks of `block_frames` samples, each a (channels, n) float32 tensor.

    Memory stays at one block whatever the file length, for libsndfile and FFmpeg (PyAV) formats alike. Empty files
    and NaN/Inf blocks raise `AudioError`. `frames_read` counts the samples delivered so far; after the last block it
    is the file's exact length.
    """

    def __init__(self, path: str | os.PathLike, block_frames: int = 441_000, check: bool = True):
        self.path = Path(path)
        self.block_frames = int(block_frames)
        self.check = check
        self._source = _open(self.path)
        self.info = self._source.info
        self.frames_read = 0

    @property
    def sample_rate(self) -> int:
        return self.info.sample_rate

    @property
    def channels(self) -> int:
        return self.info.channels

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            data = self._source.read(self.block_frames)  # (channels, n)
            if data.shape[1] == 0:
                break
            block = torch.from_numpy(data)
            if self.check:
                check_finite(block, str(self.path), self.frames_read / self.sample_rate, self.sample_rate)
            self.frames_read += block.shape[-1]
            yield block
        if self.frames_read == 0:
            raise AudioError(f"{self.path}: contains no audio samples; nothing to separate")

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> "AudioReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _to_numpy(wave: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().to("cpu", torch.float32).numpy()
    return np.asarray(wave, dtype=np.float32)


def resolve_format(path: str | os.PathLike, format: str | None = None, subtype: str | None = None) -> tuple[str, str]:
    """(format, subtype) for writing `path`: format from `format` or the file ending (a libsndfile format name, or
    M4A / OPUS, written through PyAV); subtype checked (PCM_16 by default; the lossy formats have their own and take
    none)."""
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
        if fmt not in AV_WRITE and not sf.check_format(fmt, LOSSY[fmt]):
            raise ValueError(f"this libsndfile ({sf.__libsndfile_version__}) cannot write {ext}; it needs libsndfile "
                             ">= 1.1 (`pip install -U soundfile`), or write flac")
        return fmt, LOSSY[fmt]
    subtype = (subtype or "PCM_16").upper()
    if subtype not in SUBTYPES or not sf.check_format(fmt, subtype):
        allowed = [s for s in SUBTYPES if sf.check_format(fmt, s)]
        raise ValueError(f"{ext} files cannot hold {subtype} samples; choose one of {allowed}")
    return fmt, subtype


def subtype_for(fmt: str, input_subtype: str | None) -> str:
    """The sample format a lossless output of format `fmt` (from `resolve_format`) gets when it follows its input's:
    24-bit, 32-bit and float inputs keep their depth (double becomes float); 16-bit, 8-bit and lossy inputs give
    PCM_16; a depth `fmt` cannot hold (FLAC has neither float nor 32-bit) becomes the deepest it can, PCM_24."""
    depth = {"PCM_24": "PCM_24", "PCM_32": "PCM_32", "FLOAT": "FLOAT", "DOUBLE": "FLOAT"}
    wanted = depth.get((input_subtype or "").upper(), "PCM_16")
    return next(s for s in (wanted, "PCM_24", "PCM_16") if sf.check_format(fmt, s))


def encoder_options(fmt: str, bitrate: int | None = None, sample_rate: int | None = None) -> dict:
    """Encoder keywords for format `fmt` (from `resolve_format`), checking that a bitrate is only asked of the lossy
    formats that take one (mp3, m4a, opus) and that the format can hold `sample_rate` when given.

    mp3: constant `bitrate` kbit/s (320 by default), as `soundfile.SoundFile` keywords. m4a (AAC, 256 by default) and
    opus (160 by default): `{"bitrate": kbit/s}` for the PyAV encoder.
    """
    if fmt not in DEFAULT_BITRATES:
        if bitrate is not None:
            raise ValueError(f"a bitrate applies to mp3, m4a and opus output only, not {fmt.lower()}; "
                             "leave --bitrate out")
        return {}
    kbps = DEFAULT_BITRATES[fmt] if bitrate is None else int(bitrate)
    if fmt == "M4A":
        if sample_rate is not None and int(sample_rate) not in AAC_SAMPLE_RATES:
            raise ValueError(f"m4a (AAC) holds {', '.join(str(r) for r in AAC_SAMPLE_RATES)} Hz audio, not "
                             f"{sample_rate} Hz; pass --sample-rate 44100 (or write flac)")
    if fmt in BITRATE_RANGES:
        low, high = BITRATE_RANGES[fmt]
        if not low <= kbps <= high:
            raise ValueError(f"{fmt.lower()} bitrate {bitrate} kbit/s is out of range; choose {low} to {high}")
        return {"bitrate": kbps}
    if sample_rate is not None and int(sample_rate) not in MP3_SAMPLE_RATES:
        raise ValueError(f"mp3 holds 32, 44.1 or 48 kHz audio, not {sample_rate} Hz; pass --sample-rate 44100 (or "
                         "write flac)")
    if kbps not in MP3_BITRATES:
        raise ValueError(f"mp3 bitrate {bitrate} kbit/s is not an MPEG-1 Layer III rate; choose one of "
                         f"{list(MP3_BITRATES)}")
    # libsndfile maps its compression level 0…1 linearly onto 320…32 kbit/s and takes the nearest MPEG bitrate;
    # level 1.0 itself is refused, and 0.99 lands on 32
    return dict(compression_level=min((320 - kbps) / (320 - 32), 0.99), bitrate_mode="CONSTANT")


class _AVEncoder:
    """Encode (channels, n) float32 blocks to m4a (AAC) or opus (Opus in Ogg) through PyAV, into `path`.

    The encoder takes fixed-size frames (1024 samples for AAC, 960 for Opus), so input is buffered to whole frames;
    the last one may be shorter (both encoders pad it and record the padding, so decoders drop it). Opus runs at
    48 kHz: other rates are resampled on the way in (libsoxr, streamed).
    """

    def __init__(self, path: Path, fmt: str, sample_rate: int, channels: int, bitrate: int):
        import av  # noqa: PLC0415

        muxer, codec, sample_format = AV_WRITE[fmt]
        if channels not in (1, 2):
            raise ValueError(f"{fmt.lower()} output is written as mono or stereo, not {channels} channels")
        self._av = av
        self.closed = False
        self._rate = OPUS_SAMPLE_RATE if fmt == "OPUS" else int(sample_rate)
        self._resampler = StreamResampler(sample_rate, self._rate, channels) if self._rate != sample_rate else None
        if self._resampler is not None:
            log.debug("%s: opus runs at 48 kHz; resampling from %d Hz", path, sample_rate)
        self._layout = "stereo" if channels == 2 else "mono"
        self._format = sample_format
        self._container = av.open(str(path), "w", format=muxer)
        try:
            self._stream = self._container.add_stream(codec, rate=self._rate, layout=self._layout, format=sample_format)
            self._stream.bit_rate = int(bitrate) * 1000
            self._stream.codec_context.open()
            self._frame_size = self._stream.codec_context.frame_size or 1024
        except BaseException:
            self._container.close()
            raise
        self._buf = np.zeros((channels, 0), np.float32)
        self._pts = 0

    def _encode(self, data: np.ndarray | None) -> None:
        frame = None
        if data is not None:
            array = data if self._format.endswith("p") else data.T.reshape(1, -1)
            frame = self._av.AudioFrame.from_ndarray(np.ascontiguousarray(array), format=self._format,
                                                     layout=self._layout)
            frame.sample_rate = self._rate
            frame.time_base = Fraction(1, self._rate)
            frame.pts = self._pts
            self._pts += data.shape[1]
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def write(self, data: np.ndarray, last: bool = False) -> None:
        """Append (channels, n) float32 samples; `last` flushes the resampler."""
        if self._resampler is not None:
            data = self._resampler(torch.from_numpy(data), last=last).numpy()
        self._buf = np.concatenate([self._buf, data], axis=1) if self._buf.shape[1] else data
        n = self._buf.shape[1] // self._frame_size * self._frame_size
        for i in range(0, n, self._frame_size):
            self._encode(self._buf[:, i : i + self._frame_size])
        self._buf = self._buf[:, n:]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self._resampler is not None:
                self.write(np.zeros((self._buf.shape[0], 0), np.float32), last=True)
            if self._buf.shape[1]:
                self._encode(self._buf)
            self._encode(None)  # drain the encoder
        finally:
            self._container.close()

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                self._container.close()


SNDFILE_WRITE_FRAMES = 1 << 16  # frames per libsndfile write call (see AudioWriter.write)


class AudioWriter:
    """Write (channels, n) blocks to a temporary file next to `path`; `commit()` renames it into place.

    If the writer is closed without `commit()` (an error, Ctrl-C), the temporary file is deleted, so a partial output
    never appears under the final name. Integer subtypes and the lossy formats clip samples beyond ±1 and count them
    (`clipped`, `peak`); FLOAT keeps them. `bitrate`: mp3, m4a and opus, kbit/s (`encoder_options`). m4a and opus are
    encoded by FFmpeg through PyAV; opus is always 48 kHz (other rates are resampled).
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
        # A hidden name in the same folder, so the final rename is atomic; created with normal permissions.
        self._tmp = self.path.parent / f".{self.path.name}.{uuid.uuid4().hex[:8]}.part"
        try:
            if self.format in AV_WRITE:
                self._file = _AVEncoder(self._tmp, self.format, self.sample_rate, self.channels, options["bitrate"])
            else:
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
        if isinstance(self._file, _AVEncoder):
            self._file.write(np.ascontiguousarray(data))
        else:
            # libsndfile's Vorbis encoder needs stack in proportion to one call's frames and crashes the process
            # (SIGSEGV) from about a minute of stereo audio at once: hand it bounded pieces, whatever the format.
            for start in range(0, data.shape[1], SNDFILE_WRITE_FRAMES):
                self._file.write(data[:, start : start + SNDFILE_WRITE_FRAMES].T)
        self.frames += data.shape[1]

    def commit(self) -> Path:
        """Close the file and move it to its final name; warn if samples were clipped."""
        try:
            self._file.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
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
        if isinstance(self._file, _AVEncoder):
            self._file.abort()
        elif not self._file.closed:
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
        path: output file; its ending picks the container (wav, flac, aiff, mp3, ogg, m4a, opus) unless `format`
            is given.
        wave: (channels, time) float waveform.
        subtype: PCM_16 (default), PCM_24, PCM_32 or FLOAT, for wav, flac and aiff. Integer subtypes and the lossy
            formats clip beyond ±1 with a warning.
        bitrate: mp3, m4a, opus: bitrate in kbit/s (defaults 320, 256, 160; mp3 constant).
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
