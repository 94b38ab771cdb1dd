"""The OpenVINO backend: the same ONNX export as the onnxruntime backend, compiled by OpenVINO. Parity with PyTorch
on the official fixture checkpoint and the CLI on the shared real track are tested beside onnxruntime's, in
test_onnx.py; here: an .onnx file in either runtime, device choice and its errors, int8, the missing package."""

from __future__ import annotations

import pytest
import torch
from conftest import ONNX_SEGMENT as SEGMENT
from conftest import max_rel as _rel

pytest.importorskip("onnx")
ov = pytest.importorskip("openvino")

from bsmamba2 import cli  # noqa: E402
from bsmamba2 import onnx_backend as ob  # noqa: E402
from bsmamba2.audio import read_audio  # noqa: E402
from bsmamba2.checkpoint import load_model  # noqa: E402
from bsmamba2.separate import Separator  # noqa: E402


@pytest.fixture(scope="module")
def exported(official_onnx):
    return official_onnx


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """OpenVINO's compiled-model cache and the ONNX exports go to a fresh cache per test."""
    monkeypatch.setenv("BSMAMBA2_CACHE", str(tmp_path / "cache"))


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


def test_openvino_missing_says_what_to_install(monkeypatch, exported, official_ckpt, sample_track, tmp_path, caplog):
    """Without the package: one error line naming the extra to install, from the library and from the CLI."""
    import builtins

    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ModuleNotFoundError("No module named 'openvino'", name="openvino")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    with pytest.raises(ModuleNotFoundError, match=r"bsmamba2\[openvino\]"):
        ob.OnnxModel(exported, device="cpu", runtime="openvino")
    argv = ["separate", str(sample_track / "mixture.wav"), "--checkpoint", str(official_ckpt), "--backend", "openvino",
            "--onnx", str(exported), "--segment", "1", "-o", str(tmp_path / "out"), "-q"]
    assert cli.main(argv) == 1
    assert "pip install 'bsmamba2[openvino]'" in caplog.text and "Traceback" not in caplog.text
    assert not (tmp_path / "out").exists()
