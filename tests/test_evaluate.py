"""`bsmamba2 evaluate`: MUSDB18-HQ layout checks, reports, resuming, and an end-to-end run with the official tiny
checkpoint on two tracks cut from the shared real sample (with the Table III and Table IV analyses)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from bsmamba2 import cli, metrics
from bsmamba2 import evaluate as ev
from bsmamba2.evaluate import EvalSettings, evaluate_tracks, find_tracks, validate_track

SR = 44100
# (start, stop) seconds of the shared 6.8-s sample that become the two test tracks: each is one sung phrase with a
# few silent 50-ms frames (leakage is defined), short so that the tiny model runs quickly on a CPU.
CUTS = {"Alpha": (0.0, 1.2), "Beta": (3.2, 4.4)}


def _build_root(sample_track: Path, root: Path, cuts=CUTS, subset: str = "test") -> Path:
    """A MUSDB18-HQ-layout folder with the sample cut into tracks (PCM16 copies of the real stems)."""
    for name, (a, b) in cuts.items():
        folder = root / subset / name
        folder.mkdir(parents=True, exist_ok=True)
        for stem in ev.STEMS:
            data, sr = sf.read(sample_track / f"{stem}.wav", dtype="int16")
            sf.write(folder / f"{stem}.wav", data[int(a * sr) : int(b * sr)], sr, subtype="PCM_16")
    return root


@pytest.fixture
def root(tmp_path, sample_track) -> Path:
    return _build_root(sample_track, tmp_path / "musdb")


# ---------------------------------------------------------------------------------------------------------------
# Layout


def test_find_tracks_valid_layout(root):
    tracks = find_tracks(root, "test")
    assert [t.name for t in tracks] == ["Alpha", "Beta"]
    assert tracks[0].sample_rate == SR and tracks[0].channels == 2
    assert tracks[0].frames == int(1.2 * SR)
    assert [t.name for t in find_tracks(root, "test", ["Beta"])] == ["Beta"]


def test_layout_errors_say_what_is_wrong(root, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        find_tracks(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no 'train' folder .*found: test"):
        find_tracks(root, "train")
    with pytest.raises(FileNotFoundError, match="pass the folder above train/ and test/"):
        find_tracks(root / "test" / "Alpha", "test")
    with pytest.raises(ValueError, match="subset must be one of"):
        find_tracks(root, "valid")
    with pytest.raises(ValueError, match="no track named 'Gamma'"):
        find_tracks(root, "test", ["Gamma"])

    alpha, beta = root / "test" / "Alpha", root / "test" / "Beta"
    (alpha / "bass.wav").unlink()
    data, _ = sf.read(beta / "drums.wav", dtype="int16")
    sf.write(beta / "drums.wav", data[:-100], SR, subtype="PCM_16")  # 100 samples short
    sf.write(beta / "other.wav", sf.read(beta / "other.wav", dtype="int16")[0], 48000, subtype="PCM_16")
    with pytest.raises(ValueError) as err:
        find_tracks(root, "test")
    msg = str(err.value)
    assert "2 invalid track folder(s)" in msg
    assert "'Alpha'" in msg and "missing bass.wav" in msg
    assert "drums.wav has 52820 samples but mixture.wav has 52920" in msg
    assert "other.wav is 48000 Hz but mixture.wav is 44100 Hz" in msg

    folder = tmp_path / "one" / "test" / "M"
    folder.mkdir(parents=True)
    for stem in ev.STEMS:
        sf.write(folder / f"{stem}.wav", np.zeros((SR // 2, 1 if stem == "vocals" else 2), np.int16), SR)
    with pytest.raises(ValueError, match="vocals.wav has 1 channels but mixture.wav has 2"):
        validate_track(folder)
    (folder / "mixture.wav").write_bytes(b"not audio")
    with pytest.raises(ValueError, match="cannot decode audio"):
        validate_track(folder)
    empty = tmp_path / "empty"
    (empty / "test").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no track folders"):
        find_tracks(empty)


def test_cli_reports_layout_error_as_one_line(tmp_path, official_ckpt, caplog):
    (tmp_path / "musdb" / "test" / "Song").mkdir(parents=True)
    code = cli.main(["evaluate", "--checkpoint", str(official_ckpt), "--data", str(tmp_path / "musdb"), "--no-progress"])
    assert code == 1
    assert "missing mixture.wav, vocals.wav, drums.wav, bass.wav, other.wav" in caplog.text
    caplog.clear()
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "x.ckpt"), "--data", str(tmp_path / "musdb")]) == 1


# ---------------------------------------------------------------------------------------------------------------
# The evaluation loop with a fixed, model-free separator (bookkeeping: numbers, reports, resume)


class HalfMixture:
    """Vocals = half the mixture; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def separate(self, waveform: torch.Tensor, sample_rate: int) -> dict[str, torch.Tensor]:
        self.calls += 1
        return {"vocals": 0.5 * waveform, "instrumental": 0.5 * waveform}


def test_evaluate_tracks_numbers_reports_and_resume(root, tmp_path):
    tracks = find_tracks(root)
    out = tmp_path / "report"
    settings = EvalSettings(checkpoint="half-mixture")
    sep = HalfMixture()
    res = evaluate_tracks(sep, tracks, settings, out, progress=False, sample_rate=SR)
    assert sep.calls == 2
    # numbers equal the metrics computed independently from the files
    for track, row in zip(tracks, res.rows):
        mix = sf.read(track.path("mixture"), dtype="float32")[0].T
        voc = sf.read(track.path("vocals"), dtype="float32")[0].T
        acc = sum(sf.read(track.path(s), dtype="float32")[0].T.astype(np.float64) for s in ev.ACCOMPANIMENT)
        assert row["usdr"] == pytest.approx(metrics.usdr(0.5 * mix, voc), abs=1e-9)
        assert row["csdr"] == pytest.approx(metrics.csdr(0.5 * mix, voc, SR), abs=1e-9)
        assert row["instrumental_usdr"] == pytest.approx(metrics.usdr(0.5 * mix, acc), abs=1e-9)
        assert row["duration_s"] == pytest.approx(1.2, abs=1e-3)
    assert res.summary["csdr"] == pytest.approx(np.median([r["csdr"] for r in res.rows]))
    assert res.summary["usdr"] == pytest.approx(np.mean([r["usdr"] for r in res.rows]))

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["track"] for r in rows] == ["Alpha", "Beta"] and list(rows[0]) == list(ev.TRACK_COLUMNS)
    report = json.loads((out / "results.json").read_text())
    assert report["settings"]["checkpoint"] == "half-mixture" and len(report["tracks"]) == 2
    assert "cSDR" in (out / "summary.txt").read_text()
    buckets = json.loads((out / "by_vocal_segment.json").read_text())
    assert [b["bucket"] for b in buckets["buckets"]] == ["1-2 s", "2-4 s", "4-8 s", ">=8 s"]

    # resumed: nothing separated again, same numbers
    res2 = evaluate_tracks(sep, tracks, settings, out, progress=False)
    assert sep.calls == 2 and all(t.resumed for t in res2.tracks)
    assert res2.rows == json.loads(json.dumps(res.rows))
    # other settings or resume=False recompute
    evaluate_tracks(sep, tracks, EvalSettings(checkpoint="other"), out, progress=False)
    assert sep.calls == 4
    evaluate_tracks(sep, tracks, EvalSettings(checkpoint="other"), out, resume=False, progress=False)
    assert sep.calls == 6
    # the same settings through another backend are another run
    assert "backend" not in settings.as_dict()
    evaluate_tracks(sep, tracks, EvalSettings(checkpoint="other", backend="onnxruntime"), out, progress=False)
    assert sep.calls == 8
    # a model at another rate is refused with a hint
    with pytest.raises(ValueError, match="resample the dataset"):
        evaluate_tracks(sep, tracks, settings, None, progress=False, sample_rate=48000)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="overlap-add"):
        EvalSettings(mode="paper", overlap=0.5)
    with pytest.raises(ValueError, match="mode must be"):
        EvalSettings(mode="chunks")
    with pytest.raises(ValueError, match="segment"):
        EvalSettings(segment=0)


# ---------------------------------------------------------------------------------------------------------------
# End to end with the official tiny checkpoint


def test_evaluate_end_to_end_official_tiny(root, tmp_path, official_ckpt, capsys):
    out = tmp_path / "report"
    # paper mode (non-overlapping segments); 1.2-s segments = one model call per track, sweep adds 0.6-s segments
    argv = [
        "evaluate", "--checkpoint", str(official_ckpt), "--data", str(root), "-o", str(out), "--no-progress",
        "--segment", "1.2", "--by-vocal-segment", "--segment-sweep", "0.6", "1.2", "--save-estimates",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Table III" in printed and "Table IV" in printed and "median of tracks" in printed

    report = json.loads((out / "results.json").read_text())
    assert report["settings"]["mode"] == "paper" and report["settings"]["segment"] == 1.2
    rows = report["tracks"]
    assert [r["track"] for r in rows] == ["Alpha", "Beta"]
    regions = []
    for row in rows:
        folder = root / "test" / row["track"]
        est = sf.read(out / "estimates" / row["track"] / "vocals.wav", dtype="float32")[0].T
        inst = sf.read(out / "estimates" / row["track"] / "instrumental.wav", dtype="float32")[0].T
        ref = sf.read(folder / "vocals.wav", dtype="float32")[0].T
        mix = sf.read(folder / "mixture.wav", dtype="float32")[0].T
        # the reported numbers are the metrics of the saved estimates
        assert row["usdr"] == pytest.approx(metrics.usdr(est, ref), abs=1e-6)
        assert row["csdr"] == pytest.approx(metrics.csdr(est, ref, SR), abs=1e-6)
        assert row["leakage_db"] == pytest.approx(metrics.silent_leakage(est, ref, mix, SR), abs=1e-6)
        np.testing.assert_allclose(est + inst, mix, atol=1e-5)
        for key in ("usdr", "csdr", "leakage_db", "instrumental_usdr", "instrumental_csdr", "seconds"):
            assert math.isfinite(row[key]), (row["track"], key)
        regions += metrics.region_usdr(est, ref, SR)

    # Table III: the buckets are those of the regions of the saved estimates; each track is one ~1.1-s phrase
    table = json.loads((out / "by_vocal_segment.json").read_text())["buckets"]
    expected = metrics.bucket_summary(regions)
    assert [(r["bucket"], r["regions"]) for r in table] == [(r["bucket"], r["regions"]) for r in expected]
    np.testing.assert_allclose([r["usdr"] for r in table], [r["usdr"] for r in expected], atol=1e-6)
    assert table[0]["bucket"] == "1-2 s" and table[0]["regions"] == 2
    # Table IV: one row per length; the 1.2-s row is the main evaluation; 0.6-s segments give other estimates
    sweep = json.loads((out / "segment_sweep.json").read_text())["rows"]
    assert [r["segment"] for r in sweep] == [0.6, 1.2]
    main_csdr = float(np.median([r["csdr"] for r in rows]))
    assert sweep[1]["csdr"] == pytest.approx(main_csdr)
    assert sweep[0]["csdr"] != pytest.approx(main_csdr, abs=1e-9)
    assert json.loads((out / "sweep" / "segment_0.6s" / "results.json").read_text())["settings"]["segment"] == 0.6

    # figures exist and are real images
    import matplotlib.image as mpimg

    for name in ("csdr_per_track.png", "segment_sweep.png", "spectrogram_Alpha.png"):
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, name

    # a second run resumes: no track is separated again (the spectrogram reads the saved estimate)
    stamp = {p.name: p.stat().st_mtime_ns for p in (out / "tracks").iterdir()}
    assert cli.main(argv) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "tracks").iterdir()} == stamp
    assert "Table IV" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# Figures (the spectrogram function is also used by the demo)


def test_plot_spectrograms_api(tmp_path, sample_track):
    import matplotlib.image as mpimg

    from bsmamba2 import plots

    mix, sr = sf.read(sample_track / "mixture.wav", dtype="float32")
    voc, _ = sf.read(sample_track / "vocals.wav", dtype="float32")
    fig = plots.plot_spectrograms(
        {"mixture": torch.from_numpy(mix.T), "vocals": voc.T, "mono": voc[:, 0]}, sr, tmp_path / "fig.png",
        start=1.0, duration=2.0, title="three panels",
    )  # fmt: skip
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 3
    assert images[0].get_extent()[:2] == pytest.approx([1.0, 3.0])
    assert len({im.get_clim() for im in images}) == 1  # one colour scale for all panels
    assert mpimg.imread(tmp_path / "fig.png").shape[1] > 300
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    with pytest.raises(ValueError, match="outside the signals"):
        plots.plot_spectrograms({"mixture": mix.T}, sr, start=10.0)
    # a 1-kHz tone peaks in the mel band holding 1 kHz
    t = np.arange(sr) / sr
    spec = plots.mel_spectrogram(np.sin(2 * np.pi * 1000 * t), sr, n_mels=64)
    edges = plots.mel_to_hz(np.linspace(0, plots.hz_to_mel(sr / 2), 66))
    assert edges[spec.mean(axis=1).argmax()] < 1000 < edges[spec.mean(axis=1).argmax() + 2]
