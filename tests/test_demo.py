"""`bsmamba2 demo` end to end with a small real model; `download` against local files."""

import json

import pytest
import torch

from bsmamba2 import pretrained
from bsmamba2.checkpoint import load_model, save_model
from bsmamba2.cli import main
from bsmamba2.config import BSMamba2Config
from bsmamba2.build import build_model


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    return save_model(build_model(BSMamba2Config.tiny()), path)


def test_demo_writes_audio_figure_and_scores(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--checkpoint", str(tiny_checkpoint), "--seconds", "4", "--seed", "3"]) == 0
    for name in ("mixture", "reference_vocals", "reference_instrumental", "vocals", "instrumental"):
        assert (out / f"{name}.wav").stat().st_size > 4 * 44100 * 2 * 4
    assert (out / "spectrograms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["model"]) == {"usdr", "csdr", "leakage_db"}
    assert scores["song"]["vocal_regions"], "a sparse song still has sung phrases"
    printed = capsys.readouterr().out
    assert "uSDR" in printed and "leakage" in printed
    # one line of meaning beside each of the model's scores
    meaning = printed.split("what the model's scores mean:\n", 1)[1].splitlines()
    assert [line.split()[0] for line in meaning] == ["uSDR", "cSDR", "leakage", "instrumental"]
    assert f"{scores['model']['usdr']:.2f} dB" in meaning[0] and f"{scores['model']['leakage_db']:.1f} dB" in meaning[2]
    # the leakage of every silent gap (>= 0.5 s) is in the scores and the figure
    gaps = scores["leakage_per_gap"]
    assert gaps and all(g["end"] - g["start"] >= 0.5 and g["leakage_db"] < 0 for g in gaps)
    assert set(scores["timings_s"]) == {"load_model", "synthesize", "separate", "write_audio_and_score", "figure"}


def test_explain_scores_reads_the_leakage_level():
    from bsmamba2.commands.demo import explain_scores

    scores = {"model": {"usdr": 9.0, "csdr": 2.0, "leakage_db": -34.0},
              "mixture as estimate": {"usdr": -4.0, "csdr": -10.0, "leakage_db": 0.0}, "instrumental_usdr": 12.0,
              "leakage_per_gap": [{"start": 0.0, "end": 2.0, "leakage_db": -36.0},
                                  {"start": 3.0, "end": 5.0, "leakage_db": -31.2}]}
    lines = explain_scores(scores)
    assert len(lines) == 4 and "+13.0 dB over handing back the mixture" in lines[0]
    assert "sound silent" in lines[2] and "worst gap -31 dB" in lines[2]
    scores["model"]["leakage_db"] = -15.0
    assert "clearly audible" in explain_scores(scores)[2]


def test_bundled_model_if_present_loads_and_has_a_card():
    path = pretrained.default_checkpoint()
    if path is None:
        pytest.skip("package installed without the bundled demo model")
    model = load_model(path)
    assert model.stems == ("vocals",)
    assert path.stat().st_size <= 20 * 1024 * 1024
    assert "synthetic" in pretrained.model_card().lower()


def test_download_from_url_is_atomic_and_checks_the_hash(tmp_path, tiny_checkpoint):
    url = tiny_checkpoint.as_uri()
    digest = pretrained.sha256_file(tiny_checkpoint)
    dest = pretrained.download(url, tmp_path / "m.safetensors", sha256=digest, progress=False)
    assert dest.read_bytes() == tiny_checkpoint.read_bytes()
    load_model(dest)
    with pytest.raises(ValueError, match="SHA-256"):
        pretrained.download(url, tmp_path / "bad.safetensors", sha256="0" * 64, progress=False)
    assert not (tmp_path / "bad.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_download_refuses_web_pages_and_unknown_names(tmp_path):
    page = tmp_path / "signin.html"
    page.write_text("<html>sign in</html>")
    with pytest.raises(ValueError, match="web page"):
        pretrained.download(page.as_uri(), tmp_path / "x.ckpt", progress=False)
    with pytest.raises(ValueError, match="unknown model"):
        pretrained.download("no-such-model")
    with pytest.raises(RuntimeError, match="could not download"):
        pretrained.download((tmp_path / "missing.ckpt").as_uri(), tmp_path / "y.ckpt", progress=False)


def test_download_cli_uses_cache_dir(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("BSMAMBA2_CACHE", str(tmp_path / "cache"))
    assert main(["download", tiny_checkpoint.as_uri(), "--quiet"]) == 0
    assert (tmp_path / "cache" / "tiny.safetensors").is_file()
    assert torch.equal(load_model(tmp_path / "cache" / "tiny.safetensors").final_norm.gamma,
                       load_model(tiny_checkpoint).final_norm.gamma)


def test_separator_demo_name_uses_bundled_model_and_says_so(caplog):
    if pretrained.default_checkpoint() is None:
        pytest.skip("package installed without the bundled demo model")
    from bsmamba2.separate import Separator

    with caplog.at_level("INFO"):
        sep = Separator("demo", device="cpu")
    assert sep.checkpoint_path == pretrained.default_checkpoint()
    assert sum("bundled demo model" in r.getMessage() for r in caplog.records) == 1
    out = sep.separate(torch.zeros(2, 4410), 44100)
    assert out["vocals"].shape == (2, 4410)
