"""Separator and overlap-add: exact identity, paper mode, streaming == whole file, channels, rates, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import bsmamba2.separate as separate_module
from bsmamba2.audio import AudioError, read_audio, write_audio
from bsmamba2.checkpoint import save_model
from bsmamba2.config import BSMamba2Config
from bsmamba2.build import build_model
from bsmamba2.separate import Manifest, OverlapAdd, Separator, overlap_window

SR = 44100


class Scale(nn.Module):
    """A stand-in model: every stem is a fixed multiple of the input (identity when all gains are 1)."""

    def __init__(self, gains=(1.0,), stems=("vocals",), audio_channels=2):
        super().__init__()
        self.gains = torch.tensor(gains)
        self.stems = stems
        self.audio_channels = audio_channels
        self.sample_rate = SR
        self.calls = []

    def forward_waveform(self, x):  # (b, c, t) -> (b, s, c, t)
        self.calls.append(tuple(x.shape))
        return x[:, None] * self.gains[None, :, None, None].to(x)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(BSMamba2Config.tiny()).eval()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_model):
    return save_model(tiny_model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


# -- overlap-add -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [1, 100, SR + 1, int(17.3 * SR)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
def test_identity_model_returns_input_exactly(length, overlap):
    x = torch.randn(2, length)
    sep = Separator(Scale(), device="cpu", overlap=overlap)  # default 8-s segments
    out = sep.separate(x, SR)
    assert out["vocals"].shape == x.shape
    assert torch.equal(out["vocals"], x)
    assert torch.equal(out["instrumental"], torch.zeros_like(x))


def test_in_memory_progress_reports_every_second_once():
    x = torch.randn(2, int(23.5 * SR))
    done = []
    Separator(Scale(), device="cpu").separate(x, SR, progress=done.append)
    assert len(done) > 1 and all(d > 0 for d in done)  # reported as it goes, not once at the end
    assert sum(done) == pytest.approx(23.5)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
def test_overlap_add_exact_for_any_block_sizes(overlap):
    rng = np.random.default_rng(1)
    x = torch.randn(2, 20_011)
    seg = 1000
    engine = OverlapAdd(lambda b: b[:, None], 2, 1, seg, max(1, round(seg * (1 - overlap))), batch_size=3)
    outs, i = [], 0
    while i < x.shape[-1]:
        n = int(rng.integers(1, 2500))
        outs.append(engine.push(x[:, i : i + n]))
        i += n
    outs.append(engine.finish())
    assert torch.equal(torch.cat(outs, -1)[0], x)


def test_window_is_positive_and_blends():
    w = overlap_window(100, 50)
    assert (w > 0).all() and w.max() <= 1 and torch.equal(w, w.flip(0))
    assert torch.equal(overlap_window(100, 20)[30:70], torch.ones(40, dtype=torch.float64))  # flat between ramps
    # A model whose output depends on the segment it sees: each segment returns its own index everywhere.
    seen = []

    def segment_index(b):
        out = torch.stack([torch.full_like(c, float(len(seen) + i)) for i, c in enumerate(b)])
        seen.extend(range(len(b)))
        return out[:, None]

    engine = OverlapAdd(segment_index, 1, 1, 100, 50, batch_size=1)
    y = torch.cat([engine.push(torch.ones(1, 250)), engine.finish()], -1)[0, 0]
    assert y[:50].eq(0).all()  # only segment 0 covers the start
    assert torch.allclose(y[75], ((w[75] * 0 + w[25] * 1) / (w[75] + w[25])).float())
    assert (y[50:100] >= 0).all() and (y[50:100] <= 1).all() and y[50] < y[99]  # a cross-fade, no jump


def test_streaming_buffers_stay_bounded():
    seg, hop = 4000, 2000
    engine = OverlapAdd(lambda b: b[:, None], 2, 1, seg, hop, batch_size=4)
    biggest = 0
    emitted = 0
    for _ in range(500):  # 500 blocks of 1500 samples, 187 segments
        emitted += engine.push(torch.randn(2, 1500)).shape[-1]
        biggest = max(biggest, engine._buf.shape[-1], engine._acc.shape[-1])
    emitted += engine.finish().shape[-1]
    assert emitted == 500 * 1500
    assert biggest <= seg + 4 * hop + 1500  # one segment, one batch of hops, one block


class SegmentEnergy(nn.Module):
    """A cheap model whose output depends on the whole segment it sees (so segment boundaries show)."""

    stems, audio_channels, sample_rate = ("vocals",), 2, SR

    def forward_waveform(self, x):  # (b, c, t) -> (b, 1, c, t)
        return (x * (1 + x.pow(2).mean(dim=-1, keepdim=True)))[:, None]


def test_paper_mode_equals_model_on_each_8s_segment():
    model = SegmentEnergy()
    x = torch.randn(2, int(17.5 * SR))
    sep = Separator(model, device="cpu", mode="paper", batch_size=2)
    assert sep.overlap == 0 and sep.hop_samples == sep.segment_samples == 8 * SR
    vocals = sep.separate(x, SR)["vocals"]
    seg = 8 * SR
    parts = []
    for start in range(0, x.shape[-1], seg):
        piece = x[:, start : start + seg]
        padded = torch.nn.functional.pad(piece, (0, seg - piece.shape[-1]))  # the last segment is zero-padded
        parts.append(model.forward_waveform(padded[None])[0, 0, :, : piece.shape[-1]])
    assert vocals.shape == x.shape
    assert torch.equal(vocals, torch.cat(parts, -1))
    # overlap-add mode differs: segments are blended
    assert not torch.allclose(Separator(model, device="cpu").separate(x, SR)["vocals"], vocals)


def test_paper_mode_with_real_model(tiny_model):
    x = 0.1 * torch.randn(2, 6000)
    vocals = Separator(tiny_model, device="cpu", mode="paper", segment=0.1).separate(x, SR)["vocals"]
    with torch.inference_mode():
        first = tiny_model.forward_waveform(x[None, :, :4410])[0, 0]
        last = tiny_model.forward_waveform(torch.nn.functional.pad(x[None, :, 4410:], (0, 2820)))[0, 0, :, :1590]
    assert torch.allclose(vocals, torch.cat([first, last], -1), atol=1e-5)


def test_whole_file_mode_is_one_model_call(tiny_model):
    x = 0.1 * torch.randn(2, 10_000)
    out = Separator(tiny_model, device="cpu", segment=0).separate(x, SR)
    with torch.inference_mode():
        ref = tiny_model.forward_waveform(x[None])[0, 0]
    assert torch.allclose(out["vocals"], ref, atol=1e-6)


def test_streaming_file_equals_whole_in_memory(tmp_path, tiny_model, monkeypatch):
    x = 0.1 * torch.randn(2, int(1.3 * SR))
    write_audio(tmp_path / "song.wav", x, SR, subtype="FLOAT")
    sep = Separator(tiny_model, device="cpu", segment=0.25, overlap=0.5, batch_size=2)
    whole = sep.separate(x, SR)  # one block
    monkeypatch.setattr(separate_module, "READ_BLOCK_SECONDS", 0.17)  # the file is read in 8 blocks
    paths = sep.separate_file(tmp_path / "song.wav", tmp_path / "out", subtype="FLOAT")
    for stem in ("vocals", "instrumental"):
        streamed, sr = read_audio(paths[stem])
        assert sr == SR
        assert torch.equal(streamed, whole[stem]), stem
    assert torch.allclose(whole["vocals"] + whole["instrumental"], x, atol=1e-7)


def test_instrumental_is_exact_residual(tiny_model):
    x = 0.2 * torch.randn(2, 20_000)
    out = Separator(tiny_model, device="cpu", segment=0.25, overlap=0.25).separate(x, SR)
    assert set(out) == {"vocals", "instrumental"}
    assert torch.equal(out["instrumental"], x - out["vocals"])
    assert not torch.equal(out["vocals"], x)  # a real model does not return its input


@pytest.mark.parametrize("length", [1, 100, 2047])
def test_short_inputs(tiny_model, length):
    x = 0.1 * torch.randn(2, length)
    for segment in (0.1, 0.0):  # shorter than a segment; shorter than the STFT window
        out = Separator(tiny_model, device="cpu", segment=segment).separate(x, SR)
        assert out["vocals"].shape == (2, length) and torch.isfinite(out["vocals"]).all()


def test_mono_input_to_stereo_model_gives_mono():
    model = Scale(gains=(0.25,))
    out = Separator(model, device="cpu", segment=1.0).separate(torch.ones(SR), SR)  # (time,) accepted too
    assert out["vocals"].shape == (1, SR) and torch.allclose(out["vocals"], torch.full((1, SR), 0.25))
    assert all(shape[1] == 2 for shape in model.calls)  # the model always saw two channels


def test_mono_model_runs_channels_separately():
    model = Scale(gains=(0.5,), audio_channels=1)
    x = torch.randn(2, 5000)
    out = Separator(model, device="cpu", segment=0.1, overlap=0.5).separate(x, SR)
    assert torch.allclose(out["vocals"], 0.5 * x, atol=1e-7)
    assert all(shape[1] == 1 for shape in model.calls)


def test_multi_stem_model_and_stem_order():
    model = Scale(gains=(0.1, 0.9), stems=("drums", "vocals"))
    x = torch.randn(2, 4000)
    sep = Separator(model, device="cpu", segment=0.05)
    out = sep.separate(x, SR)
    assert list(out) == ["drums", "vocals", "instrumental"] == list(sep.output_stems)
    assert torch.allclose(out["vocals"], 0.9 * x, atol=1e-6)
    assert torch.allclose(out["instrumental"], 0.1 * x, atol=1e-6)


def test_resampling_round_trip_22k_mono(tmp_path):
    sr = 22050
    t = torch.arange(2 * sr, dtype=torch.float64) / sr
    x = (0.4 * torch.sin(2 * math.pi * 440 * t) + 0.2 * torch.sin(2 * math.pi * 3000 * t)).float()[None]
    write_audio(tmp_path / "low.wav", x, sr, subtype="FLOAT")
    sep = Separator(Scale(gains=(0.5,)), device="cpu", segment=1.0)
    paths = sep.separate_file(tmp_path / "low.wav", tmp_path / "out", subtype="FLOAT")
    vocals, vsr = read_audio(paths["vocals"])
    inst, isr = read_audio(paths["instrumental"])
    assert vsr == isr == sr and vocals.shape == inst.shape == x.shape
    assert torch.allclose(vocals + inst, x, atol=1e-6)
    assert (vocals - 0.5 * x)[:, 500:-500].abs().max() < 1e-4  # band-limited content survives 22.05→44.1→22.05 kHz
    # and an explicit output rate
    out = sep.separate(x, sr, output_sample_rate=44100)
    assert out["vocals"].shape == (1, 4 * sr)


def test_separate_file_result_reports_timing(tmp_path):
    write_audio(tmp_path / "a.wav", 0.1 * torch.randn(2, SR // 2), SR)
    res = Separator(Scale(), device="cpu", segment=0.2).separate_file_result(tmp_path / "a.wav", tmp_path / "o")
    assert res.duration == pytest.approx(0.5) and res.elapsed > 0 and res.rtf == pytest.approx(res.elapsed / 0.5)
    assert sorted(p.name for p in res.outputs.values()) == ["instrumental.wav", "vocals.wav"]
    assert sorted(p.name for p in (tmp_path / "o" / "a").iterdir()) == ["instrumental.wav", "vocals.wav"]


@pytest.mark.parametrize("input_ext, input_subtype, out_format, subtype, expect", [
    ("wav", "PCM_24", "wav", None, "PCM_24"),  # the default follows the input's depth
    ("wav", "FLOAT", "wav", None, "FLOAT"),
    ("wav", "PCM_16", "wav", None, "PCM_16"),
    ("flac", "PCM_24", "aiff", None, "PCM_24"),
    ("wav", "FLOAT", "flac", None, "PCM_24"),  # FLAC holds no float: the deepest it can
    ("mp3", "MPEG_LAYER_III", "wav", None, "PCM_16"),  # a lossy input
    ("wav", "FLOAT", "wav", "INPUT", "FLOAT"),  # the default by its name (manifests, catalogs)
    ("wav", "PCM_24", "wav", "PCM_16", "PCM_16"),  # an explicit choice wins
    ("wav", "PCM_24", "mp3", None, "MPEG_LAYER_III"),  # lossy outputs have their own
])
def test_stems_keep_the_inputs_bit_depth_by_default(tmp_path, input_ext, input_subtype, out_format, subtype, expect):
    import soundfile as sf  # noqa: PLC0415

    song = tmp_path / f"song.{input_ext}"
    write_audio(song, 0.1 * torch.randn(2, SR // 2), SR, subtype=None if input_ext == "mp3" else input_subtype)
    assert sf.info(str(song)).subtype == input_subtype
    paths = Separator(Scale(), device="cpu", segment=0).separate_file(song, tmp_path / "out", format=out_format,
                                                                      subtype=subtype)
    assert {stem: sf.info(str(p)).subtype for stem, p in paths.items()} == {"vocals": expect, "instrumental": expect}


# -- errors --------------------------------------------------------------------------------------------------------
def test_waveform_errors():
    sep = Separator(Scale(), device="cpu")
    x = torch.zeros(2, 1000)
    x[0, 500] = float("inf")
    with pytest.raises(AudioError, match="NaN or Inf"):
        sep.separate(x, SR)
    with pytest.raises(AudioError, match="no audio samples"):
        sep.separate(torch.zeros(2, 0), SR)
    with pytest.raises(AudioError, match="3 channels.*--downmix"):
        sep.separate(torch.zeros(3, 100), SR)
    assert sep.separate(torch.rand(6, 100), SR, downmix=True)["vocals"].shape == (2, 100)


def test_file_errors_leave_no_outputs(tmp_path):
    sep = Separator(Scale(), device="cpu", segment=0.1)
    bad = torch.zeros(2, SR)
    bad[:, -10] = float("nan")
    write_audio(tmp_path / "nan.wav", bad, SR, subtype="FLOAT")
    with pytest.raises(AudioError, match="nan.wav: contains NaN"):
        sep.separate_file(tmp_path / "nan.wav", tmp_path / "out")
    assert not any(p.is_file() for p in (tmp_path / "out").rglob("*"))
    write_audio(tmp_path / "four.wav", torch.zeros(4, 100), SR)
    with pytest.raises(AudioError, match="four.wav: has 4 channels"):
        sep.separate_file(tmp_path / "four.wav", tmp_path / "out")
    paths = sep.separate_file(tmp_path / "four.wav", tmp_path / "out", downmix=True)
    assert read_audio(paths["vocals"])[0].shape == (2, 100)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(segment=-1), "segment must be >= 0"),
        (dict(segment=0.01), "shorter than the model's 2048-sample"),
        (dict(overlap=1.0), "overlap must be in"),
        (dict(batch_size=0), "batch size"),
        (dict(mode="fast"), "unknown mode"),
        (dict(device="tpu"), "unknown device"),
        (dict(precision="fp16"), "fp16 needs a GPU"),
    ],
)
def test_bad_settings(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Separator(tiny_model, **{"device": "cpu", **kwargs})


def test_checkpoint_errors(tmp_path, tiny_ckpt, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.ckpt not found.*bsmamba2-musdb.*bsmamba2 models"):
        Separator(tmp_path / "nope.ckpt", device="cpu")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(np.random.bytes(4096))
    with pytest.raises(ValueError, match="checkpoint .*garbage.ckpt"):
        Separator(garbage, device="cpu")
    # a checkpoint whose stored config does not match its weights
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(tiny_ckpt), "pt") as f:
        header = dict(f.metadata())
    config = json.loads(header["config"])
    config["dim"] = 24
    header["config"] = json.dumps(config)
    save_file(load_file(str(tiny_ckpt)), str(tmp_path / "mismatch.safetensors"), metadata=header)
    with pytest.raises(ValueError, match="mismatch.safetensors.*do not match") as err:
        Separator(tmp_path / "mismatch.safetensors", device="cpu")
    assert "\n" not in str(err.value)
    # no model given: the default is the paper's; offline and not cached, the error says how to get it
    monkeypatch.setenv("BSMAMBA2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BSMAMBA2_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"bsmamba2-musdb is not in the cache.*drive.google.com.*--model PATH") as err:
        Separator(device="cpu")
    assert "\n" not in str(err.value)
    # the bundled demo model by name, with no network
    sep = Separator("demo", device="cpu")
    assert sep.checkpoint_path.name.startswith("demo-") and sep.stems == ("vocals",)


def test_official_checkpoint_loads(official_ckpt):
    sep = Separator(official_ckpt, device="cpu", segment=0)
    out = sep.separate(0.1 * torch.randn(2, 4410), SR)
    assert out["vocals"].shape == (2, 4410) and torch.isfinite(out["vocals"]).all()
    assert len(sep.checkpoint_sha256) == 64


# -- precision on the CPU ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("native", [True, False])
def test_cpu_default_precision_follows_the_cpus_bf16(monkeypatch, native):
    from bsmamba2.quantize import Bf16Linear  # noqa: PLC0415

    monkeypatch.setattr(separate_module, "cpu_bf16_native", lambda: native)
    sep = Separator("demo", device="cpu")
    assert sep.precision_name == ("bf16 projections" if native else "fp32")
    assert sep.settings()["precision"] == ("bfloat16" if native else "float32")  # manifests tell the two apart
    assert any(isinstance(m, Bf16Linear) for m in sep.model.modules()) == native
    # an explicit choice wins either way
    assert Separator("demo", device="cpu", precision="fp32").precision_name == "fp32"
    assert Separator("demo", device="cpu", precision="bf16").precision_name == "bf16 projections"
    # a caller's own module is run as given unless a precision is asked for
    own = build_model(BSMamba2Config.tiny())
    assert Separator(own, device="cpu").precision_name == "fp32"
    assert any(type(m) is nn.Linear for m in own.modules())  # and is never changed in place


def test_cpu_bf16_costs_under_five_hundredths_of_a_db_on_real_music(sample_track):
    from bsmamba2.metrics import usdr  # noqa: PLC0415

    mix, sr = read_audio(sample_track / "mixture.wav")
    ref, _ = read_audio(sample_track / "vocals.wav")
    est = {p: Separator("demo", device="cpu", precision=p, segment=0).separate(mix, sr)["vocals"]
           for p in ("fp32", "bf16")}
    rel = float((est["bf16"] - est["fp32"]).norm() / est["fp32"].norm())
    assert 1e-4 < rel < 2e-2  # really the bf16 path, and close
    assert abs(usdr(est["bf16"], ref) - usdr(est["fp32"], ref)) < 0.05


# -- manifest ------------------------------------------------------------------------------------------------------
def test_manifest_round_trip(tmp_path):
    song = tmp_path / "song.wav"
    write_audio(song, torch.zeros(1, 10), SR)
    out = tmp_path / "out" / "v.wav"
    out.parent.mkdir()
    out.write_bytes(b"x")
    m = Manifest(tmp_path / "out")
    digest = m.input_sha256(song)
    m.update(song, status="done", input_sha256=digest, checkpoint_sha256="c", settings={"segment": 8.0})
    again = Manifest(tmp_path / "out")
    assert again.is_done(song, digest, "c", {"segment": 8.0}, {"vocals": out})
    assert not again.is_done(song, digest, "other", {"segment": 8.0}, {"vocals": out})
    assert not again.is_done(song, digest, "c", {"segment": 4.0}, {"vocals": out})
    assert not again.is_done(song, digest, "c", {"segment": 8.0}, {"vocals": tmp_path / "missing.wav"})
    (tmp_path / "out" / "manifest.json").write_text("{not json")
    assert Manifest(tmp_path / "out").files == {}
