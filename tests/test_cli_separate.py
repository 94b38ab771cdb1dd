"""`bsmamba2 separate` end to end on real files: outputs, rates, channels, batch runs, resume, and every error case."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from bsmamba2.audio import audio_info, read_audio, write_audio
from bsmamba2.checkpoint import save_model
from bsmamba2.cli import main
from bsmamba2.config import BSMamba2Config
from bsmamba2.build import build_model

SR = 44100
PCM16_STEP = 1 / 32767


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(build_model(BSMamba2Config.tiny()).eval(), tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="module")
def short(sample_track, tmp_path_factory):
    """Half a second of the real sample mixture, for tests about files rather than chunking."""
    wave, sr = read_audio(sample_track / "mixture.wav")
    return write_audio(tmp_path_factory.mktemp("in") / "short.wav", wave[:, sr : sr + sr // 2], sr)


@pytest.fixture(scope="module")
def excerpt(sample_track, tmp_path_factory):
    """The first second of the real sample mixture, PCM16 stereo at 44.1 kHz."""
    wave, sr = read_audio(sample_track / "mixture.wav")
    return write_audio(tmp_path_factory.mktemp("in") / "excerpt.wav", wave[:, :sr], sr)


@pytest.fixture
def log(caplog):
    caplog.set_level(logging.INFO)
    return caplog


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _check_outputs(out_dir, track, mixture_path, tol):
    mix, sr = read_audio(mixture_path)
    vocals, vsr = read_audio(out_dir / track / "vocals.wav")
    inst, isr = read_audio(out_dir / track / "instrumental.wav")
    assert vsr == isr == sr
    assert vocals.shape == inst.shape == mix.shape
    assert (vocals + inst - mix).abs().max() <= tol
    assert vocals.abs().max() > 0 and not torch.allclose(vocals, mix, atol=1e-3)
    return vocals, inst


def test_official_checkpoint_through_cli(official_ckpt, excerpt, tmp_path, log):
    rc = main(["separate", str(excerpt), "-o", str(tmp_path), "--checkpoint", str(official_ckpt),
               "--segment", "0", "--subtype", "FLOAT", "--quiet"])  # fmt: skip
    assert rc == 0, _errors(log)
    _check_outputs(tmp_path, "excerpt", excerpt, tol=1e-6)


def test_sample_track_default_settings(tiny_ckpt, sample_track, tmp_path, log):
    mixture = sample_track / "mixture.wav"
    rc = main(["separate", str(mixture), "-o", str(tmp_path), "--checkpoint", str(tiny_ckpt)])
    assert rc == 0, _errors(log)
    _check_outputs(tmp_path, "mixture", mixture, tol=2 * PCM16_STEP)  # each output rounded to PCM16 once
    assert audio_info(tmp_path / "mixture" / "vocals.wav").subtype == "PCM_16"
    summary = [m for m in log.messages if "real-time factor" in m]
    assert len(summary) == 1 and "6.8 s of audio" in summary[0]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (entry,) = manifest["files"].values()
    assert entry["status"] == "done" and len(entry["input_sha256"]) == 64 and len(entry["checkpoint_sha256"]) == 64
    assert entry["settings"]["segment"] == 8.0 and entry["settings"]["overlap"] == 0.5 and entry["rtf"] > 0
    assert entry["settings"]["subtype"] == "INPUT"  # the stems follow the input's depth (16-bit here)


def test_resampled_mono_input(tiny_ckpt, excerpt, tmp_path, log):
    wave, _ = read_audio(excerpt)
    import soxr

    low = soxr.resample(wave[:, :SR].mean(0).numpy(), SR, 22050)  # 1 s, mono, 22.05 kHz
    src = tmp_path / "low.flac"
    sf.write(src, low, 22050, subtype="PCM_24")
    rc = main(["separate", str(src), "-o", str(tmp_path / "out"), "--checkpoint", str(tiny_ckpt),
               "--segment", "0.5", "--subtype", "FLOAT", "--quiet"])  # fmt: skip
    assert rc == 0, _errors(log)
    for stem in ("vocals", "instrumental"):
        info = audio_info(tmp_path / "out" / "low" / f"{stem}.wav")
        assert (info.sample_rate, info.channels, info.frames) == (22050, 1, len(low))
    _check_outputs(tmp_path / "out", "low", src, tol=1e-6)
    # --sample-rate writes another rate; --format/--subtype/--stems pick the files
    rc = main(["separate", str(src), "-o", str(tmp_path / "o44"), "--checkpoint", str(tiny_ckpt), "--segment", "0.5",
               "--sample-rate", "44100", "--format", "flac", "--subtype", "pcm_24", "--stems", "vocals", "-q"])  # fmt: skip
    assert rc == 0, _errors(log)
    assert sorted(p.name for p in (tmp_path / "o44" / "low").iterdir()) == ["vocals.flac"]
    info = audio_info(tmp_path / "o44" / "low" / "vocals.flac")
    assert (info.sample_rate, info.channels, info.frames, info.subtype) == (44100, 1, 2 * len(low), "PCM_24")
    # mp3 at a chosen bitrate; a 22.05 kHz output cannot be mp3, and that is told before a model is loaded
    rc = main(["separate", str(src), "-o", str(tmp_path / "mp3"), "--checkpoint", str(tiny_ckpt), "--segment", "0.5",
               "--sample-rate", "44100", "--format", "mp3", "--bitrate", "192", "-q"])  # fmt: skip
    assert rc == 0, _errors(log)
    info = audio_info(tmp_path / "mp3" / "low" / "vocals.mp3")
    assert (info.format, info.sample_rate, info.frames) == ("MP3", 44100, 2 * len(low))
    settings = json.loads((tmp_path / "mp3" / "manifest.json").read_text())["files"].popitem()[1]["settings"]
    assert settings["bitrate"] == 192 and settings["subtype"] == "MPEG_LAYER_III"
    for extra, message in [(["--sample-rate", "22050"], "not 22050 Hz"), (["--subtype", "PCM_24"], "lossy"),
                           (["--bitrate", "100"], "not an MPEG-1")]:
        log.clear()
        assert main(["separate", str(src), "-o", str(tmp_path / "bad"), "--format", "mp3", *extra]) == 1
        assert any(message in e for e in _errors(log)), _errors(log)
        assert not (tmp_path / "bad").exists() and not any("bundled demo model" in m for m in log.messages)


def test_every_error_case_names_the_file_and_others_still_run(tiny_ckpt, short, tmp_path, log):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + np.random.bytes(100))
    sf.write(bad / "empty.wav", np.zeros((0, 2), np.float32), SR)
    nan = np.zeros((SR // 2, 2), np.float32)
    nan[1000, 0] = np.inf
    sf.write(bad / "nan.wav", nan, SR, subtype="FLOAT")
    sf.write(bad / "three.wav", 0.1 * np.random.randn(SR // 4, 3).astype(np.float32), SR)
    out = tmp_path / "out"
    rc = main(["separate", str(bad / "missing.wav"), str(bad / "corrupt.wav"), str(bad / "empty.wav"),
               str(bad / "nan.wav"), str(bad / "three.wav"), str(short),
               "-o", str(out), "--checkpoint", str(tiny_ckpt), "--segment", "0", "-q"])  # fmt: skip
    assert rc == 1
    errors = _errors(log)
    expected = {
        "missing.wav": "no such file",
        "corrupt.wav": "cannot decode audio",
        "empty.wav": "contains no audio samples",
        "nan.wav": "NaN or Inf",
        "three.wav": "--downmix",
    }
    for name, what in expected.items():
        lines = [e for e in errors if name in e]
        assert len(lines) == 1 and what in lines[0] and "\n" not in lines[0], (name, errors)
    assert any("5 failed" in m for m in log.messages)
    assert (out / "short" / "vocals.wav").exists()  # the good input still ran
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "short"]  # no partial outputs
    statuses = {os.path.basename(k): v["status"] for k, v in json.loads((out / "manifest.json").read_text())["files"].items()}
    assert statuses["short.wav"] == "done" and statuses["nan.wav"] == statuses["three.wav"] == "failed"
    # the fix the message names works
    rc = main(["separate", str(bad / "three.wav"), "-o", str(out), "--checkpoint", str(tiny_ckpt), "--segment", "0",
               "--downmix", "-q"])  # fmt: skip
    assert rc == 0 and audio_info(out / "three" / "vocals.wav").channels == 2


@pytest.mark.parametrize("kind", ["missing", "garbage", "mismatched", "none"])
def test_checkpoint_errors(kind, tiny_ckpt, short, tmp_path, log, monkeypatch):
    if kind == "missing":
        ckpt, what = tmp_path / "nope.ckpt", "not found"
    elif kind == "garbage":
        ckpt, what = tmp_path / "garbage.ckpt", "garbage.ckpt"
        ckpt.write_bytes(np.random.bytes(3000))
    elif kind == "mismatched":
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(str(tiny_ckpt), "pt") as f:
            header = dict(f.metadata())
        config = json.loads(header["config"])
        config["depth"] = 2
        header["config"] = json.dumps(config)
        ckpt, what = tmp_path / "other.safetensors", "do not match"
        save_file(load_file(str(tiny_ckpt)), str(ckpt), metadata=header)
    else:  # no --model: the paper's model, which offline and uncached is missing
        monkeypatch.setenv("BSMAMBA2_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("BSMAMBA2_OFFLINE", "1")
        ckpt, what = None, "bsmamba2-musdb is not in the cache"
    args = ["separate", str(short), "-o", str(tmp_path / "out"), "-q"] + (["--checkpoint", str(ckpt)] if ckpt else [])
    assert main(args) == 1
    (line,) = _errors(log)
    assert what in line and "\n" not in line
    if kind == "none":
        assert "bsmamba2 download bsmamba2-musdb" in line and "--model PATH" in line
    assert not (tmp_path / "out" / "short").exists()


def test_skip_existing_overwrite_and_resume(tiny_ckpt, short, tmp_path, log):
    second = write_audio(tmp_path / "in" / "second.wav", read_audio(short)[0][:, : SR // 4], SR)
    out = tmp_path / "out"
    base = ["separate", str(short), str(second), "-o", str(out), "--checkpoint", str(tiny_ckpt), "--segment", "0"]
    assert main(base) == 0
    first_vocals = out / "short" / "vocals.wav"
    stamp = first_vocals.stat().st_mtime_ns

    log.clear()
    assert main(base) == 0  # nothing to do: both skipped
    assert first_vocals.stat().st_mtime_ns == stamp
    assert sum("skipped, outputs exist" in m for m in log.messages) == 2

    # an interrupted run: the second input was running and only one of its outputs was written
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    key = str(second.resolve())
    manifest["files"][key]["status"] = "running"
    manifest_path.write_text(json.dumps(manifest))
    (out / "second" / "instrumental.wav").unlink()
    log.clear()
    assert main(base) == 0
    assert first_vocals.stat().st_mtime_ns == stamp  # done work is kept
    assert (out / "second" / "instrumental.wav").exists()
    assert json.loads(manifest_path.read_text())["files"][key]["status"] == "done"
    assert any("1 separated, 1 skipped" in m for m in log.messages)

    # other settings: the manifest tells the existing outputs are stale
    log.clear()
    assert main(base + ["--overlap", "0.25"]) == 0
    assert any("2 separated" in m for m in log.messages)
    assert json.loads(manifest_path.read_text())["files"][key]["settings"]["overlap"] == 0.25

    # --overwrite redoes everything
    stamp = first_vocals.stat().st_mtime_ns
    assert main(base + ["--overlap", "0.25", "--overwrite"]) == 0
    assert first_vocals.stat().st_mtime_ns != stamp


def test_folders_templates_and_collisions(tiny_ckpt, short, tmp_path, log):
    wave = read_audio(short)[0][:, : SR // 4]
    write_audio(tmp_path / "music" / "a" / "song.wav", wave, SR)
    write_audio(tmp_path / "music" / "b" / "song.flac", wave, SR)
    (tmp_path / "music" / "notes.txt").write_text("not audio")
    out = tmp_path / "music" / "separated"  # inside the searched folder: its outputs must not be picked up
    base = ["separate", str(tmp_path / "music"), "--checkpoint", str(tiny_ckpt), "--segment", "0"]
    assert main(base + ["-o", str(out)]) == 1
    assert any("song.flac" in e and "{parent}" in e for e in _errors(log))
    assert not out.exists() or not any(out.rglob("*.wav"))  # caught before anything was separated
    assert any("nothing separated" in m for m in log.messages)
    log.clear()
    assert main(base + ["-o", str(out), "--template", "{parent}/{track}/{stem}.{ext}"]) == 0, _errors(log)
    assert (out / "a" / "song" / "vocals.wav").exists() and (out / "b" / "song" / "instrumental.wav").exists()
    log.clear()
    assert main(base + ["-o", str(out), "--template", "{parent}/{track}/{stem}.{ext}"]) == 0
    assert sum("skipped, outputs exist" in m for m in log.messages) == 2  # the outputs folder was not searched


def test_same_name_other_ending_in_one_folder(tiny_ckpt, short, tmp_path, log):
    """song.wav and song.m4a side by side: {parent} cannot tell them apart, so the error names {filename}, and
    the template it suggests separates both."""
    wave = read_audio(short)[0][:, : SR // 4]
    write_audio(tmp_path / "in" / "song.wav", wave, SR)
    write_audio(tmp_path / "in" / "song.flac", wave, SR)
    out = tmp_path / "out"
    base = ["separate", str(tmp_path / "in" / "song.wav"), str(tmp_path / "in" / "song.flac"),
            "--checkpoint", str(tiny_ckpt), "--segment", "0", "-o", str(out)]
    assert main(base) == 1
    errors = _errors(log)
    assert any("song.flac" in e and "{filename}/{stem}.{ext}" in e for e in errors), errors
    log.clear()
    assert main(base + ["--template", "{filename}/{stem}.{ext}"]) == 0, _errors(log)
    assert (out / "song.wav" / "vocals.wav").exists() and (out / "song.flac" / "vocals.wav").exists()


def test_quiet_and_progress(tiny_ckpt, short, tmp_path, capsys, log):
    assert main(["separate", str(short), "-o", str(tmp_path / "q"), "--checkpoint", str(tiny_ckpt),
                 "--segment", "0", "--quiet"]) == 0  # fmt: skip
    assert "%|" not in capsys.readouterr().err
    assert not any("real-time factor" in m for m in log.messages)
    assert main(["separate", str(short), "-o", str(tmp_path / "p"), "--checkpoint", str(tiny_ckpt),
                 "--segment", "0", "--paper"]) == 0  # fmt: skip
    assert "short.wav" in capsys.readouterr().err  # the per-file progress bar, over audio seconds
    assert any("real-time factor" in m for m in log.messages)
    settings = json.loads((tmp_path / "p" / "manifest.json").read_text())["files"].popitem()[1]["settings"]
    assert settings["mode"] == "paper" and settings["overlap"] == 0.0


def test_progress_into_a_log_has_one_numbered_bar_per_file(tiny_ckpt, short, tmp_path, capsys, log):
    second = tmp_path / "in" / "second.wav"
    second.parent.mkdir()
    second.write_bytes(short.read_bytes())
    assert main(["separate", str(short), str(second), "-o", str(tmp_path / "out"), "--checkpoint", str(tiny_ckpt),
                 "--segment", "0", "--template", "{filename}/{stem}.{ext}"]) == 0  # fmt: skip
    err = capsys.readouterr().err  # captured: not a terminal
    assert "\x1b[" not in err  # no cursor movement between stacked bars
    assert "[1/2] short.wav" in err and "[2/2] second.wav" in err
    assert "files:" not in err


def test_only_missing_inputs_stop_before_loading_a_model(tmp_path, log):
    out = tmp_path / "out"
    rc = main(["separate", str(tmp_path / "nosuch.wav"), "-o", str(out)])
    assert rc == 1
    assert any("nosuch.wav" in e and "no such file" in e for e in _errors(log))
    assert not any("bundled demo model" in m for m in log.messages)  # no model was loaded for nothing
    assert not out.exists()


def test_empty_input_path_is_refused_not_taken_as_this_folder(tmp_path, capsys, monkeypatch):
    """`bsmamba2 separate "$SONG"` with SONG unset must not separate every song under the current folder."""
    (tmp_path / "song.wav").write_bytes(b"")  # would be found if "" meant "."
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["separate", "", "-o", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "empty path" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
