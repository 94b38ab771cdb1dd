"""FFmpeg decoding and encoding through PyAV: m4a/AAC, Opus in webm, video containers, exact lengths, block-by-block
reading, m4a/opus output, and separation of these files end to end (API and CLI) with a tiny model.

The compressed inputs are made here, with PyAV, from the shared real track; no system ffmpeg is involved.
"""

from __future__ import annotations

import logging
import math
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

import bsmamba2.separate as separate_module
from bsmamba2.audio import (
    AudioError,
    AudioReader,
    AudioWriter,
    audio_info,
    read_audio,
    resample,
    resampled_length,
    write_audio,
)
from bsmamba2.checkpoint import save_model
from bsmamba2.cli import main
from bsmamba2.commands.separate import find_inputs
from bsmamba2.config import BSMamba2Config
from bsmamba2.build import build_model
from bsmamba2.separate import Separator

SR = 44100
SECONDS = 1.5


def _encode(path, wave: np.ndarray, rate: int, codec: str, sample_format: str, muxer: str, video: bool = False,
            audio: bool = True, bitrate: int = 128_000):
    """Write (channels, n) float32 `wave` with PyAV: one audio stream (and a small video stream when `video`)."""
    layout = "stereo" if wave.shape[0] == 2 else "mono"
    with av.open(str(path), "w", format=muxer) as container:
        vstream = None
        if video:
            vstream = container.add_stream("mpeg4", rate=10)
            vstream.width, vstream.height, vstream.pix_fmt = 64, 48, "yuv420p"
        if audio:
            stream = container.add_stream(codec, rate=rate, layout=layout, format=sample_format)
            stream.bit_rate = bitrate
            stream.codec_context.open()
            size = stream.codec_context.frame_size or 1024
            data = wave
            if sample_format.startswith("s16"):
                data = np.round(np.clip(wave, -1, 1) * 32767).astype(np.int16)
            for i in range(0, data.shape[1], size):
                block = data[:, i : i + size]
                array = block if sample_format.endswith("p") else block.T.reshape(1, -1)
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(array), format=sample_format, layout=layout)
                frame.sample_rate, frame.pts, frame.time_base = rate, i, Fraction(1, rate)
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
        if vstream is not None:
            for i in range(int(SECONDS * 10)):
                image = np.full((48, 64, 3), 20 * i % 255, np.uint8)
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = i
                for packet in vstream.encode(frame):
                    container.mux(packet)
            for packet in vstream.encode(None):
                container.mux(packet)
    return path


@pytest.fixture(scope="module")
def mixture(sample_track) -> torch.Tensor:
    """1.5 s (plus an odd 123 samples, so no codec frame size divides it) of the real sample mixture."""
    wave, sr = read_audio(sample_track / "mixture.wav")
    assert sr == SR
    return wave[:, SR : SR + int(SECONDS * SR) + 123].contiguous()


@pytest.fixture(scope="module")
def inputs(mixture, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("compressed")
    x = mixture.numpy()
    x48 = resample(mixture, SR, 48000).numpy()
    return {
        "m4a": _encode(folder / "song.m4a", x, SR, "aac", "fltp", "ipod"),
        "webm": _encode(folder / "phone.webm", x48, 48000, "libopus", "flt", "webm"),
        "mp4": _encode(folder / "clip.mp4", x, SR, "aac", "fltp", "mp4", video=True),
        "alac": _encode(folder / "lossless.m4a", x, SR, "alac", "s16p", "ipod"),
        "mkv-flac": _encode(folder / "film.mkv", x, SR, "flac", "s16", "matroska", video=True),
        "mov": _encode(folder / "camera.mov", x, SR, "aac", "fltp", "mov", video=True),
        "avi-pcm": _encode(folder / "old.avi", x, SR, "pcm_s16le", "s16", "avi", video=True),
        "wma": _encode(folder / "store.wma", x, SR, "wmav2", "fltp", "asf"),
        "silent-video": _encode(folder / "silent.mp4", x, SR, "aac", "fltp", "mp4", video=True, audio=False),
    }


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(BSMamba2Config.tiny()).eval()


def _snr(ref: torch.Tensor, est: torch.Tensor) -> float:
    return 10 * math.log10(ref.pow(2).sum() / (est - ref).pow(2).sum())


# -- decoding --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, rate, min_snr", [("m4a", SR, 15), ("webm", 48000, 15), ("mp4", SR, 15),
                                                 ("mov", SR, 15), ("mkv-flac", SR, 80), ("alac", SR, 80),
                                                 ("avi-pcm", SR, 80)])
def test_decoded_length_rate_channels_are_exact(inputs, mixture, name, rate, min_snr):
    wave, sr = read_audio(inputs[name])
    n = mixture.shape[1] if rate == SR else resampled_length(mixture.shape[1], SR, rate)
    # the encoder's priming samples and last-frame padding are dropped: exactly the samples that went in
    assert (sr, wave.shape) == (rate, (2, n)) and wave.dtype == torch.float32
    ref = mixture if rate == SR else resample(mixture, SR, rate)
    assert _snr(ref, wave) > min_snr  # aligned, not shifted by the priming
    info = audio_info(inputs[name])
    assert (info.sample_rate, info.channels) == (rate, 2) and abs(info.frames - n) < 0.05 * n


def test_lossless_in_a_container_decodes_bit_exact(inputs, mixture):
    pcm16 = torch.from_numpy(np.round(np.clip(mixture.numpy(), -1, 1) * 32767).astype(np.int16)).float() / 32768
    for name in ("alac", "mkv-flac", "avi-pcm"):
        assert torch.equal(read_audio(inputs[name])[0], pcm16), name


def test_wma_decodes_at_its_rate_and_about_its_length(inputs, mixture):
    # ASF keeps no sample-exact end, so the length is what FFmpeg's decoder gives: within one 2048-sample frame
    wave, sr = read_audio(inputs["wma"])
    assert sr == SR and wave.shape[0] == 2 and abs(wave.shape[1] - mixture.shape[1]) <= 2048
    with AudioReader(inputs["wma"], block_frames=3000) as reader:
        assert torch.equal(torch.cat(list(reader), -1), wave)


@pytest.mark.parametrize("name", ["m4a", "webm", "mp4"])
def test_blocks_and_ranges_equal_the_whole(inputs, name):
    whole, _ = read_audio(inputs[name])
    for block in (1000, 4096, 44100):
        with AudioReader(inputs[name], block_frames=block) as reader:
            parts = list(reader)
            assert reader.frames_read == whole.shape[1]
        assert all(p.shape[1] <= block for p in parts)
        assert torch.equal(torch.cat(parts, -1), whole)
    assert torch.equal(read_audio(inputs[name], start=12345, frames=777)[0], whole[:, 12345:13122])


def test_no_audio_stream_and_undecodable_files(inputs, tmp_path):
    with pytest.raises(AudioError, match=r"silent.mp4: has no audio stream \(streams: video\)"):
        read_audio(inputs["silent-video"])
    with pytest.raises(AudioError, match="has no audio stream"):
        AudioReader(inputs["silent-video"])
    fake = tmp_path / "fake.m4a"
    fake.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(AudioError, match=r"fake.m4a: cannot decode audio .*FFmpeg"):
        audio_info(fake)
    truncated = tmp_path / "cut.m4a"
    truncated.write_bytes(inputs["m4a"].read_bytes()[:400])
    with pytest.raises(AudioError, match="cut.m4a"):
        read_audio(truncated)


def test_folder_search_finds_the_new_extensions(inputs):
    files, errors = find_inputs([inputs["m4a"].parent])
    assert not errors
    assert {f.name for f in files} == {"song.m4a", "phone.webm", "clip.mp4", "lossless.m4a", "film.mkv", "silent.mp4",
                                       "camera.mov", "old.avi", "store.wma"}


# -- encoding --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext, bitrate", [("m4a", 192), ("opus", 128)])
def test_m4a_and_opus_output(tmp_path, mixture, ext, bitrate):
    path = write_audio(tmp_path / f"out.{ext}", mixture, SR, bitrate=bitrate)
    assert [p.name for p in tmp_path.iterdir()] == [f"out.{ext}"]  # temp name renamed, nothing else left
    back, sr = read_audio(path)
    rate = SR if ext == "m4a" else 48000  # opus is always 48 kHz
    assert (sr, back.shape[0]) == (rate, 2)
    assert back.shape[1] == resampled_length(mixture.shape[1], SR, rate)
    assert _snr(mixture if rate == SR else resample(mixture, SR, rate), back) > 15
    kbps = path.stat().st_size * 8 / (mixture.shape[1] / SR) / 1000
    assert 0.6 * bitrate < kbps < 1.4 * bitrate


def test_av_output_errors_and_aborts_leave_nothing(tmp_path, mixture):
    with pytest.raises(ValueError, match=r"m4a \(AAC\) holds .* not 37800 Hz; pass --sample-rate 44100"):
        AudioWriter(tmp_path / "a.m4a", 37800, 2)
    with pytest.raises(ValueError, match="opus bitrate 600 kbit/s is out of range; choose 6 to 510"):
        AudioWriter(tmp_path / "a.opus", SR, 2, bitrate=600)
    with pytest.raises(ValueError, match="lossy format.*leave --subtype out"):
        AudioWriter(tmp_path / "a.m4a", SR, 2, subtype="PCM_24")
    writer = AudioWriter(tmp_path / "b.m4a", SR, 2)
    writer.write(mixture[:, :5000])
    with pytest.raises(ValueError, match=r"expected a \(2, time\) block"):
        writer.write(mixture[:1])
    writer.abort()
    with AudioWriter(tmp_path / "c.opus", SR, 1) as w:
        w.write(torch.linspace(-2, 2, 3000)[None])  # beyond ±1: clipped and counted, like mp3
    assert w.clipped > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.opus"]


# -- separation ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["m4a", "mp4"])
def test_separating_compressed_files_streams_exactly(inputs, tiny_model, tmp_path, monkeypatch, name):
    mix, sr = read_audio(inputs[name])
    sep = Separator(tiny_model, device="cpu", segment=0.75, overlap=0.25)  # three overlapping segments
    whole = sep.separate(mix, sr)
    monkeypatch.setattr(separate_module, "READ_BLOCK_SECONDS", 0.23)  # many blocks, none aligned to codec frames
    result = sep.separate_file_result(inputs[name], tmp_path / "out", subtype="FLOAT")
    assert result.sample_rate == sr and result.channels == 2
    assert result.duration == mix.shape[1] / sr  # the exact decoded length, not the container's estimate
    outs = {stem: read_audio(p) for stem, p in result.outputs.items()}
    for stem, (wave, rate) in outs.items():
        assert rate == sr and wave.shape == mix.shape, stem
        assert torch.equal(wave, whole[stem]), stem  # streaming == whole file
    vocals, inst = outs["vocals"][0], outs["instrumental"][0]
    assert torch.equal(inst, mix - vocals)  # the exact residual of the decoded mixture
    assert torch.allclose(vocals + inst, mix, atol=1e-7, rtol=0)


def test_cli_separates_m4a_webm_and_video_to_m4a_and_opus(inputs, tiny_model, tmp_path, caplog):
    ckpt = save_model(tiny_model, tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    caplog.set_level(logging.INFO)
    base = ["-o", str(out), "--checkpoint", str(ckpt), "--segment", "0", "-q"]
    args = ["separate", str(inputs["m4a"]), str(inputs["mp4"]), str(inputs["silent-video"]), *base]
    assert main(args + ["--format", "m4a", "--bitrate", "160"]) == 1  # the video without sound fails, alone
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "silent.mp4: has no audio stream" in errors[0]
    for track, source in (("song", "m4a"), ("clip", "mp4")):
        for stem in ("vocals", "instrumental"):
            wave, sr = read_audio(out / track / f"{stem}.m4a")
            assert sr == SR and wave.shape == read_audio(inputs[source])[0].shape
    assert not (out / "silent").exists()
    assert main(["separate", str(inputs["webm"]), *base, "--format", "opus"]) == 0
    wave, sr = read_audio(out / "phone" / "vocals.opus")
    assert sr == 48000 and wave.shape == read_audio(inputs["webm"])[0].shape
    assert not [p for p in out.rglob("*.part")]
