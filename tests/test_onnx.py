"""ONNX export and the onnxruntime backend: parity with PyTorch, metadata, the CLI, errors, int8.

One export per test session (`official_onnx` in conftest: `bsmamba2 export --onnx`, the official fixture checkpoint,
1-s segments): tracing is what costs time here, so every test shares that file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from conftest import ONNX_SEGMENT as SEGMENT
from conftest import max_rel as _rel

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from bsmamba2 import cli  # noqa: E402
from bsmamba2 import onnx_backend as ob  # noqa: E402
from bsmamba2.audio import read_audio  # noqa: E402
from bsmamba2.checkpoint import load_model, save_model  # noqa: E402
from bsmamba2.config import BSMamba2Config  # noqa: E402
from bsmamba2.model import BSMamba2  # noqa: E402
from bsmamba2.pretrained import sha256_file  # noqa: E402
from bsmamba2.separate import Separator  # noqa: E402

SR = 44100


@pytest.fixture(scope="module")
def exported(official_onnx):
    return official_onnx


@pytest.fixture(scope="module")
def official_model(official_ckpt):
    return load_model(official_ckpt)


@pytest.fixture(scope="module")
def session(exported):
    """One onnxruntime session of the export (creating one optimizes the graph: seconds)."""
    return ob.OnnxModel(exported, device="cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch, exported, official_ckpt):
    """An empty cache with the export in place where `--backend onnxruntime` looks for this checkpoint's."""
    monkeypatch.setenv("BSMAMBA2_CACHE", str(tmp_path / "cache"))
    target = ob.cache_path(sha256_file(official_ckpt), round(SEGMENT * SR), "fp32")
    target.parent.mkdir(parents=True)
    shutil.copy(exported, target)
    return target


def test_export_is_valid_real_valued_and_described(exported, official_ckpt, official_model):
    proto = onnx.load(str(exported))
    onnx.checker.check_model(proto, full_check=True)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert ob.complex_values(proto) == []
    types = {onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)
             for v in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]}
    assert not any("COMPLEX" in t for t in types), types
    (inp,), (out,) = proto.graph.input, proto.graph.output
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [2, 1025, 101, 2]  # free batch, fixed segment
    meta = ob.read_metadata(exported)
    assert meta["segment_samples"] == str(round(SEGMENT * SR)) and meta["sample_rate"] == str(SR)
    assert json.loads(meta["stems"]) == ["vocals"] and meta["precision"] == "fp32"
    assert json.loads(meta["config"])["dim"] == official_model.config.dim
    assert meta["checkpoint_sha256"] == sha256_file(official_ckpt)
    assert meta["bsmamba2_version"]
    umask = os.umask(0)
    os.umask(umask)
    assert exported.stat().st_mode & 0o777 == 0o666 & ~umask  # a plain file's permissions, not mkstemp's 0600
    assert [p.name for p in exported.parent.iterdir()] == [exported.name]  # no temporary left behind


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_onnx_runtimes_equal_pytorch(session, exported, official_model, runtime):
    """fp32 parity on the official fixture checkpoint, at a batch size other than the one traced (2), in both
    runtimes (OpenVINO compiles the same file)."""
    if runtime == "openvino":
        pytest.importorskip("openvino")
        session = ob.OnnxModel(exported, device="cpu", runtime="openvino", threads=2)
        assert session.providers == ["CPU"]
    wave = 0.3 * torch.randn(3, 2, round(SEGMENT * SR))
    with torch.no_grad():
        spec = official_model.stft(wave)
        ref_spec = official_model(spec)
        ref = official_model.istft(ref_spec, wave.shape[-1])
    assert _rel(session.run_spectrum(spec), ref_spec) <= 1e-4
    assert _rel(session.forward_waveform(wave), ref) <= 1e-4
    assert _rel(session.forward_waveform(wave[:1]), ref[:1]) <= 1e-4


def test_real_network_is_the_model(official_model):
    """The traced module, in eager PyTorch: the model's function with (real, imag) as a last axis."""
    wave = 0.3 * torch.randn(2, 2, 20000)
    with torch.no_grad():
        spec = official_model.stft(wave)
        ref = torch.view_as_real(official_model(spec))
        out = ob.RealSpectrumNetwork(official_model)(torch.view_as_real(spec))
    assert _rel(out, ref) <= 1e-5


def test_separator_backends_agree_on_real_track(exported, official_ckpt, sample_track):
    mix, sr = read_audio(sample_track / "mixture.wav")
    mix = mix[:, sr : sr * 5 // 2]  # 1.5 s: with overlap 0.5, a batch of 3 segments and one of 1
    kw = dict(device="cpu", segment=SEGMENT, overlap=0.5, batch_size=3)
    ref = Separator(official_ckpt, precision="fp32", **kw).separate(mix, sr)  # fp32 where the CPU's default is bf16
    onnx_sep = Separator(official_ckpt, backend="onnxruntime", onnx=exported, **kw)
    assert onnx_sep.settings()["backend"] == "onnxruntime"
    out = onnx_sep.separate(mix, sr)
    for stem in ("vocals", "instrumental"):
        assert _rel(out[stem], ref[stem]) <= 1e-4, stem
    alone = Separator(exported, **kw).separate(mix, sr)  # the .onnx file on its own, config from its metadata
    assert _rel(alone["vocals"], ref["vocals"]) <= 1e-4


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_cli_onnx_runtimes_equal_torch_on_real_track(tmp_path, cache, official_ckpt, sample_track, runtime):
    if runtime == "openvino":
        pytest.importorskip("openvino")
    common = [str(sample_track / "mixture.wav"), "--checkpoint", str(official_ckpt), "--segment", str(SEGMENT),
              "--format", "wav", "--subtype", "FLOAT", "-q", "--device", "cpu", "--paper"]
    assert cli.main(["separate", *common, "-o", str(tmp_path / "torch"), "--precision", "fp32"]) == 0
    assert cli.main(["separate", *common, "-o", str(tmp_path / runtime), "--backend", runtime]) == 0
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name]  # found in the cache, nothing exported
    for stem in ("vocals", "instrumental"):
        a, _ = read_audio(tmp_path / "torch" / "mixture" / f"{stem}.wav")
        b, _ = read_audio(tmp_path / runtime / "mixture" / f"{stem}.wav")
        assert a.shape == b.shape and _rel(b, a) <= 1e-4, stem
    manifest = json.loads((tmp_path / runtime / "manifest.json").read_text())
    assert next(iter(manifest["files"].values()))["settings"]["backend"] == runtime


def test_onnx_file_of_another_model_is_refused(tmp_path, exported):
    other = save_model(BSMamba2(BSMamba2Config.tiny()), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="exported from another model"):
        Separator(other, backend="onnxruntime", onnx=exported, device="cpu", segment=SEGMENT)


def test_segment_mismatch_is_refused(exported):
    with pytest.raises(ValueError, match=r"exported for segments of 44100 samples.*--segment 1"):
        Separator(exported, device="cpu", segment=2.0)
    with pytest.raises(ValueError, match="fixed-length segments"):
        Separator(exported, device="cpu", segment=0)


def test_wrong_input_length_is_refused(session):
    with pytest.raises(ValueError, match=r"expected a waveform \(batch, 2, 44100\)"):
        session.forward_waveform(torch.zeros(1, 2, 1000))


def test_foreign_onnx_and_missing_files(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), str(foreign))
    with pytest.raises(ValueError, match="not a bsmamba2 export"):
        Separator(foreign, device="cpu")
    with pytest.raises(FileNotFoundError, match="bsmamba2 export CHECKPOINT --onnx"):
        Separator(tmp_path / "missing.onnx", device="cpu")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all \xff\xfe")
    with pytest.raises(ValueError, match="not a readable ONNX file|not a bsmamba2 export"):
        Separator(garbage, device="cpu")


def test_providers():
    assert ob.resolve_providers(None, "cpu") == ["CPUExecutionProvider"]
    assert ob.resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert ob.resolve_providers(None, "auto")[-1] == "CPUExecutionProvider"
    with pytest.raises(ValueError, match="not in this onnxruntime build"):
        ob.resolve_providers("NoSuchExecutionProvider")
    if "DmlExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ValueError, match="onnxruntime-directml"):
            ob.resolve_providers(["dml", "cpu"])


def test_int8_onnx_and_torch_stay_close_to_fp32(tmp_path, exported, official_ckpt, official_model, caplog):
    """Dynamic int8 (onnxruntime and torch) against fp32: a small error, not a different function."""
    with caplog.at_level(logging.INFO):
        int8 = ob.quantize_onnx_int8(exported, tmp_path / "int8.onnx")
    assert not [r for r in caplog.records if "pre-process" in r.getMessage()]  # onnxruntime's advice is not ours
    assert ob.read_metadata(int8)["precision"] == "int8"
    assert int8.stat().st_size < exported.stat().st_size
    ops = [n.op_type for n in onnx.load(str(int8)).graph.node]
    weights = ob.weight_matmuls(exported)
    assert ops.count("MatMulInteger") == len(weights) > 0 and "MatMul" in ops  # products of activations stay fp32
    wave = 0.3 * torch.randn(1, 2, round(SEGMENT * SR))
    with torch.no_grad():
        ref = official_model.forward_waveform(wave)
    q_ort = ob.OnnxModel(int8, device="cpu").forward_waveform(wave)
    q_torch = Separator(official_ckpt, device="cpu", precision="int8", segment=SEGMENT)

    def snr(y):
        return float(10 * torch.log10(ref.pow(2).sum() / (y - ref).pow(2).sum()))

    with torch.no_grad():
        y_torch = q_torch.model.forward_waveform(wave)
    assert 20 < snr(q_ort) < 200 and 20 < snr(y_torch) < 200  # close, and actually quantized
    assert q_torch.settings()["precision"] == "int8"
    with pytest.raises(ValueError, match="already int8"):
        ob.quantize_onnx_int8(int8, tmp_path / "twice.onnx")


def test_export_cli_errors(tmp_path, official_ckpt):
    assert cli.main(["export", str(tmp_path / "nope.ckpt"), "--onnx", str(tmp_path / "x.onnx")]) == 1
    assert cli.main(["export", str(official_ckpt), "--onnx", str(tmp_path / "x.onnx"), "--segment", "0"]) == 1
    assert not (tmp_path / "x.onnx").exists()


def test_evaluate_onnxruntime_equals_torch(tmp_path, tiny_musdb, exported, official_ckpt):
    scores = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        argv = ["evaluate", "--checkpoint", str(official_ckpt), "--data", str(tiny_musdb), "-o", str(out),
                "--segment", str(SEGMENT), "--no-progress", "--no-plots", "--device", "cpu", "--backend", backend]
        argv += ["--onnx", str(exported)] if backend == "onnxruntime" else ["--precision", "fp32"]
        assert cli.main(argv) == 0
        scores[backend] = json.loads((out / "results.json").read_text())["tracks"]
    assert [r["track"] for r in scores["torch"]] == [r["track"] for r in scores["onnxruntime"]] == ["Cut D"]
    for a, b in zip(scores["torch"], scores["onnxruntime"]):
        assert b["usdr"] == pytest.approx(a["usdr"], abs=1e-3) and b["csdr"] == pytest.approx(a["csdr"], abs=1e-3)


def test_given_export_is_quantized_into_the_cache_once(cache, exported, official_ckpt, sample_track, monkeypatch):
    """`--onnx FILE --precision int8`: the fp32 file is checked from its metadata and quantized into the cache; only
    the int8 file is loaded by the runtime. An int8 file cannot serve fp32."""
    loaded = []
    real_runner = ob._onnxruntime_runner
    monkeypatch.setattr(ob, "_onnxruntime_runner", lambda path, *a: loaded.append(path.name) or real_runner(path, *a))
    sep = Separator(official_ckpt, backend="onnxruntime", onnx=exported, precision="int8", device="cpu",
                    segment=SEGMENT)
    # named by the quantization scheme: an int8 file cached by an earlier scheme is not picked up
    assert sep.model.precision == "int8" and len(loaded) == 1
    assert loaded[0].endswith(f"-int8-{ob.INT8_SCHEME}-opset18.onnx")
    mix, sr = read_audio(sample_track / "mixture.wav")
    assert sep.separate(mix[:, : 2 * sr], sr)["vocals"].shape == (2, 2 * sr)
    with pytest.raises(ValueError, match="is int8; it cannot be turned into fp32"):
        Separator(official_ckpt, backend="onnxruntime", onnx=sep.model.path, device="cpu", segment=SEGMENT)
    with pytest.raises(ValueError, match="exported for segments of"):
        Separator(official_ckpt, backend="onnxruntime", onnx=exported, precision="int8", device="cpu", segment=2.0)
