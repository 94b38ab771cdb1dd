"""The OpenVINO backend: the same ONNX export as the onnxruntime backend, compiled by OpenVINO. Parity with PyTorch
on the official fixture checkpoint, the CLI on the shared real track, device choice and its errors, int8."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnx")
ov = pytest.importorskip("openvino")

from bsmamba2 import cli  # noqa: E402
from bsmamba2 import onnx_backend as ob  # noqa: E402
from bsmamba2.audio import read_audio  # noqa: E402
from bsmamba2.checkpoint import load_model  # noqa: E402
from bsmamba2.separate import Separator  # noqa: E402

SEGMENT = 1.0  # seconds: 101 STFT frames


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def exported(tmp_path_factory, official_ckpt):
    path = tmp_path_factory.mktemp("openvino") / "tiny.onnx"
    assert cli.main(["export", str(official_ckpt), "--onnx", str(path), "--segment", str(SEGMENT)]) == 0
    return path


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """OpenVINO's compiled-model cache and the ONNX exports go to a fresh cache per test."""
    monkeypatch.setenv("BSMAMBA2_CACHE", str(tmp_path / "cache"))


def test_openvino_equals_pytorch(exported, official_ckpt):
    """fp32 parity on the official fixture checkpoint, at two batch sizes (the export's batch axis is free)."""
    model = load_model(official_ckpt)
    net = ob.OnnxModel(exported, device="cpu", runtime="openvino", threads=2)
    assert net.runtime == "openvino" and net.providers == ["CPU"]
    wave = 0.3 * torch.randn(3, 2, round(SEGMENT * 44100))
    with torch.no_grad():
        spec = model.stft(wave)
        ref_spec = model(spec)
        ref = model.istft(ref_spec, wave.shape[-1])
    assert _rel(net.run_spectrum(spec), ref_spec) <= 1e-4
    assert _rel(net.forward_waveform(wave), ref) <= 1e-4
    assert _rel(net.forward_waveform(wave[:1]), ref[:1]) <= 1e-4


def test_cli_openvino_equals_torch_on_real_track(tmp_path, official_ckpt, sample_track, caplog):
    """`--backend openvino` without --onnx: the checkpoint is exported into the cache once, then compiled."""
    common = [str(sample_track / "mixture.wav"), "--checkpoint", str(official_ckpt), "--segment", str(SEGMENT),
              "--format", "wav", "--subtype", "FLOAT", "-q", "--device", "cpu", "--paper"]
    assert cli.main(["separate", *common, "-o", str(tmp_path / "torch")]) == 0
    assert cli.main(["separate", *common, "-o", str(tmp_path / "ov"), "--backend", "openvino"]) == 0
    exports = list((tmp_path / "cache" / "onnx").glob("*.onnx"))
    assert len(exports) == 1 and ob.read_metadata(exports[0])["precision"] == "fp32"
    for stem in ("vocals", "instrumental"):
        a, _ = read_audio(tmp_path / "torch" / "mixture" / f"{stem}.wav")
        b, _ = read_audio(tmp_path / "ov" / "mixture" / f"{stem}.wav")
        assert a.shape == b.shape and _rel(b, a) <= 1e-4, stem
    manifest = json.loads((tmp_path / "ov" / "manifest.json").read_text())
    assert next(iter(manifest["files"].values()))["settings"]["backend"] == "openvino"


def test_onnx_file_runs_in_openvino_when_asked(exported, sample_track):
    mix, sr = read_audio(sample_track / "mixture.wav")
    mix = mix[:, sr : sr * 5 // 2]
    kw = dict(device="cpu", segment=SEGMENT, overlap=0.5, batch_size=3)
    by_ort = Separator(exported, **kw)  # an .onnx file alone runs in onnxruntime unless another runtime is asked for
    by_ov = Separator(exported, backend="openvino", **kw)
    assert by_ort.backend == "onnxruntime" and by_ov.backend == "openvino"
    a, b = by_ort.separate(mix, sr), by_ov.separate(mix, sr)
    assert _rel(b["vocals"], a["vocals"]) <= 1e-4


def test_openvino_devices():
    assert ob.resolve_openvino_device(None, "cpu") == "CPU"
    assert ob.resolve_openvino_device(None, "auto") == "AUTO"
    assert ob.resolve_openvino_device("cpu") == "CPU"
    assert ob.resolve_openvino_device(["auto"]) == "AUTO"
    with pytest.raises(ValueError, match="not present here.*OpenVINO sees"):
        ob.resolve_openvino_device("NO_SUCH_DEVICE")
    with pytest.raises(ValueError, match="no OpenVINO device"):
        ob.resolve_openvino_device(" , ")
    with pytest.raises(ValueError, match="unknown ONNX runtime"):
        ob.OnnxModel("x.onnx", runtime="tensorflow")


def test_int8_export_runs_in_openvino(tmp_path, exported, official_ckpt):
    """The int8 export (dynamic MatMul quantization) compiles in OpenVINO: close to fp32, but not equal."""
    pytest.importorskip("onnxruntime")  # the quantizer is onnxruntime's
    int8 = ob.quantize_onnx_int8(exported, tmp_path / "int8.onnx")
    wave = 0.3 * torch.randn(1, 2, round(SEGMENT * 44100))
    with torch.no_grad():
        ref = load_model(official_ckpt).forward_waveform(wave)
    y = ob.OnnxModel(int8, device="cpu", runtime="openvino").forward_waveform(wave)
    snr = float(10 * torch.log10(ref.pow(2).sum() / (y - ref).pow(2).sum()))
    assert 20 < snr < 200


def test_openvino_missing_says_what_to_install(monkeypatch, exported):
    import builtins

    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ModuleNotFoundError("No module named 'openvino'", name="openvino")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    with pytest.raises(ModuleNotFoundError, match=r"bsmamba2\[openvino\]"):
        ob.OnnxModel(exported, device="cpu", runtime="openvino")
