"""ONNX export of the network and an ONNX Runtime backend for separation.

What is exported is the part of the model between the STFT and the iSTFT, for one fixed segment length (separation
always calls the model on segments of one length) and any batch size, with a real-valued interface so that no complex
tensor appears anywhere in the graph (DirectML, ROCm and CoreML providers have no complex types):

    input  "spec"   float32 (batch, channels, freq, frames, 2)         the mixture's STFT, (real, imag) last
    output "stems"  float32 (batch, stems, channels, freq, frames, 2)  the masked spectra, (real, imag) last

STFT, iSTFT and overlap-add stay in the package (`OnnxModel.forward_waveform` runs them around the session). Two
runtimes execute the file: onnxruntime (execution providers for CUDA, DirectML, CoreML, ROCm, ...) and OpenVINO
(Intel and AMD x86 CPUs, Intel GPUs and NPUs; `RUNTIMES`). The
graph is traced from the plain-PyTorch scan (`BSMAMBA2_BACKEND=torch`): the band-split, mask-estimator and Mamba2
modules in their per-band, unsliced reference forms, which are the functions the fast paths are tested against.

The ONNX file carries what is needed to use it without the checkpoint, as metadata (`metadata_props`): the model's
config (JSON), segment length in samples, frames, sample rate, stems, audio channels, precision, the bsmamba2 version
and the SHA-256 of the checkpoint it came from. `OnnxModel` checks them against the segment (and, when given, the
checkpoint) it is asked to serve and says what to do on a mismatch.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from bsmamba2 import MissingExtra
from bsmamba2.config import ModelConfig, config_from_dict, config_to_dict

log = logging.getLogger(__name__)

OPSET = 18
INPUT_NAME, OUTPUT_NAME = "spec", "stems"
FORMAT_NAME = "bsmamba2-onnx"
PRECISIONS = ("fp32", "int8")
# Providers tried, in this order, when none are asked for and the device is not "cpu"; CPU always comes last.
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider",
                       "ROCMExecutionProvider", "MIGraphXExecutionProvider")
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "dml": "DmlExecutionProvider",
                    "directml": "DmlExecutionProvider", "coreml": "CoreMLExecutionProvider",
                    "rocm": "ROCMExecutionProvider", "migraphx": "MIGraphXExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider", "openvino": "OpenVINOExecutionProvider"}
INSTALL_HINT = "pip install 'bsmamba2[onnx]' (or: pip install onnx onnxruntime)"
OPENVINO_HINT = "pip install 'bsmamba2[openvino]' (or: pip install onnx openvino)"
INT8_SCHEME = "u8w"  # quantize_onnx_int8's scheme: uint8 weights of the weight MatMuls (int8 weights saturated)
RUNTIMES = ("onnxruntime", "openvino")  # what can run an export: the Separator's backends besides "torch"


def _import_onnx(hint: str = INSTALL_HINT):
    try:
        import onnx  # noqa: PLC0415
    except ModuleNotFoundError as err:
        raise MissingExtra(f"ONNX export needs the onnx package: {hint}", name=err.name) from err
    return onnx


def _import_ort():
    try:
        import onnxruntime  # noqa: PLC0415
    except ModuleNotFoundError as err:
        raise MissingExtra(f"the onnxruntime backend needs onnxruntime: {INSTALL_HINT}", name=err.name) from err
    return onnxruntime


def _import_openvino():
    try:
        import openvino  # noqa: PLC0415
    except ModuleNotFoundError as err:
        raise MissingExtra(f"the openvino backend needs OpenVINO: {OPENVINO_HINT}", name=err.name) from err
    return openvino


# -- the exported network -------------------------------------------------------------------------------------------
class RealSpectrumNetwork(nn.Module):
    """A BSMamba2 model from mixture spectrum to masked stem spectra, with (real, imag) as a last axis of 2.

    The same function as `model(spec)` with `torch.view_as_real` around it, written so that tracing gives a graph of
    real tensors with a fixed number of frames and a free batch: the band split and mask estimators run their
    per-band reference loops, and each bidirectional block its plain form (`BiMamba2Block._plain`: no CPU slicing of
    the batch into pieces, which would depend on the batch size, and no writes into preallocated outputs).

    Args:
        model: a `bsmamba2.model.BSMamba2`.
    Shapes: `(b, c, f, t, 2)` → `(b, stems, c, f, t, 2)`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        from bsmamba2.model import BSMamba2  # noqa: PLC0415

        if not isinstance(model, BSMamba2):
            raise ValueError(f"ONNX export supports BSMamba2 models; got {type(model).__name__}")
        self.model = model

    def forward(self, spec: Tensor) -> Tensor:
        m = self.model
        b, c, f, t, _ = spec.shape
        feats = spec.permute(0, 3, 2, 1, 4).reshape(b, t, f * c * 2)  # (b, t, f·c·2), ordered (f, c, re/im)
        x = m.band_split.forward_reference(feats)  # (b, t, k, d)
        for time_module, band_module in m.layers:
            x = m._along_time(x, time_module._plain)
            x = m._along_bands(x, band_module._plain)
        x = m.final_norm(x)
        re, im = spec[..., 0], spec[..., 1]  # (b, c, f, t)
        out = []
        for est in m.mask_estimators:
            mask = est.forward_reference(x).reshape(b, t, f, c, 2).permute(0, 3, 2, 1, 4)  # (b, c, f, t, 2)
            mr, mi = mask[..., 0], mask[..., 1]
            out.append(torch.stack([re * mr - im * mi, re * mi + im * mr], dim=-1))  # complex product, in reals
        return torch.stack(out, dim=1)  # (b, stems, c, f, t, 2)


def frames_for(samples: int, hop_length: int) -> int:
    """STFT frames of a segment of `samples` (center=True)."""
    return samples // hop_length + 1


@contextlib.contextmanager
def _plain_scan():
    """The plain-PyTorch scan for the duration of an export (the Triton kernels cannot be traced into ONNX)."""
    from bsmamba2 import switches  # noqa: PLC0415

    before = switches.get_backend()
    switches.set_backend("torch")
    try:
        yield
    finally:
        switches.set_backend(before)


@contextlib.contextmanager
def _quiet(*names: str):
    """The exporter's libraries log every pass at INFO; keep them to warnings while exporting."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(model: nn.Module, path: str | os.PathLike, segment_samples: int, *, precision: str = "fp32",
                checkpoint_sha256: str | None = None, opset: int = OPSET) -> Path:
    """Export `model`'s network for segments of `segment_samples` to an ONNX file (written atomically).

    Args:
        model: a BSMamba2 model (CPU, float32).
        path: the .onnx file to write.
        segment_samples: samples per segment at the model's sample rate; the graph has this many STFT frames.
        precision: "fp32", or "int8": the fp32 graph with its MatMul weights quantized by onnxruntime's
            `quantize_dynamic` (activations quantized per call).
        checkpoint_sha256: recorded in the metadata so a later load can tell the file belongs to a checkpoint.
        opset: ONNX opset, >= 17.
    Returns:
        the path written.
    """
    onnx = _import_onnx()
    if precision not in PRECISIONS:
        raise ValueError(f"unknown ONNX precision {precision!r}; choose one of {PRECISIONS}")
    if opset < 17:
        raise ValueError(f"opset {opset} is too old; the export needs opset 17 or newer")
    cfg = model.config
    if segment_samples <= cfg.stft.n_fft // 2:
        raise ValueError(f"segment of {segment_samples} samples is shorter than the STFT needs "
                         f"({cfg.stft.n_fft // 2 + 1}); use a longer --segment")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu", torch.float32).eval()
    net = RealSpectrumNetwork(model).eval()
    channels = 2 if cfg.stereo else 1
    frames = frames_for(segment_samples, cfg.stft.hop_length)
    example = torch.randn(2, channels, cfg.stft.n_fft // 2 + 1, frames, 2)
    batch = torch.export.Dim("batch", min=1, max=4096)
    start = time.perf_counter()
    log.info("exporting %s (segment %d samples, %d frames) to ONNX opset %d; this takes a minute or more",
             type(model).__name__, segment_samples, frames, opset)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        requires = [p.requires_grad for p in net.parameters()]
        for p in net.parameters():
            p.requires_grad_(False)
        chatter = io.StringIO()  # the exporter prints its stages; they go to the debug log instead
        try:
            with _plain_scan(), torch.no_grad(), contextlib.redirect_stdout(chatter), _quiet("onnx_ir", "onnxscript"):
                program = torch.onnx.export(
                    net, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME], dynamic_shapes={"spec": {0: batch}}, optimize=False, verbose=False,
                )  # fmt: skip
        finally:
            for p, r in zip(net.parameters(), requires):
                p.requires_grad_(r)
        log.debug("torch.onnx: %s", chatter.getvalue().strip())
        with _quiet("onnx_ir", "onnxscript"):
            _tidy(program.model)
        proto = program.model_proto
        meta = {
            "format": FORMAT_NAME, "bsmamba2_version": _version(), "config": json.dumps(config_to_dict(cfg)),
            "segment_samples": str(segment_samples), "frames": str(frames), "sample_rate": str(cfg.stft.sample_rate),
            "stems": json.dumps(list(model.stems)), "audio_channels": str(channels), "precision": "fp32",
            "checkpoint_sha256": checkpoint_sha256 or "", "opset": str(opset),
            "interface": f"{INPUT_NAME}: float32 (batch, channels, freq, frames, re/im) -> "
                         f"{OUTPUT_NAME}: float32 (batch, stems, channels, freq, frames, re/im)",
        }  # fmt: skip
        _set_metadata(proto, meta)
        onnx.checker.check_model(proto, full_check=True)
        bad = complex_values(proto)
        if bad:  # an internal invariant of RealSpectrumNetwork
            raise RuntimeError(f"the exported graph has complex tensors ({bad[:5]}); this is a bug in bsmamba2")
        onnx.save_model(proto, tmp)
        if precision == "int8":
            quantize_onnx_int8(tmp, tmp)
        _publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("wrote %s (%.1f MB) in %.0f s", path, path.stat().st_size / 1e6, time.perf_counter() - start)
    return path


def _tidy(model) -> None:
    """Constant folding, dead-node removal, deduplication and CSE on the exported `onnx_ir` model, in place.

    This is the exporter's `optimize=True` without its pattern rewriter, which on this graph (thousands of nodes,
    unrolled chunk loops) took ~60% of a 3-minute export and changed little: the graph comes out with the same op
    kinds (no Sequence or Constant nodes left), and onnxruntime fuses at session start anyway."""
    import onnx_ir.passes.common as passes  # noqa: PLC0415
    import onnxscript.optimizer as optimizer  # noqa: PLC0415

    optimizer.inline(model)
    optimizer.fold_constants(model)
    optimizer.remove_unused_nodes(model)
    for step in (passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                 passes.DeduplicateInitializersPass(), passes.CommonSubexpressionEliminationPass(),
                 passes.RemoveUnusedNodesPass()):
        step(model)


def quantize_onnx_int8(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Dynamic 8-bit quantization of an fp32 export's weight MatMuls (onnxruntime `quantize_dynamic`, uint8 weights
    and activations), keeping its metadata with precision set to "int8". `src` and `dst` may be the same file; `dst`
    is written atomically."""
    onnx = _import_onnx()
    _import_ort()
    from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415

    dst = Path(dst)
    meta = read_metadata(src)
    if meta.get("precision") != "fp32":
        raise ValueError(f"{src}: is already {meta.get('precision')}; quantize an fp32 export")
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # uint8 weights: with int8 weights, onnxruntime 1.32's u8s8 kernels on AVX2 CPUs without VNNI saturate (the
        # fixture's output fell to 9.5 dB SNR against fp32; 28.3 dB with uint8, 27.4 with 7-bit int8 weights)
        with _without_preprocessing_advice():
            quantize_dynamic(str(src), tmp, op_types_to_quantize=["MatMul"], nodes_to_quantize=weight_matmuls(src),
                             weight_type=QuantType.QUInt8)  # fmt: skip
        proto = onnx.load(tmp)
        _set_metadata(proto, meta | {"precision": "int8"})
        onnx.save_model(proto, tmp)
        _publish(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst


@contextlib.contextmanager
def _without_preprocessing_advice():
    """`quantize_dynamic` logs advice to pre-process the model (shape inference for image models) on the root logger
    every time; it does not apply to a user quantizing our export, so it is dropped while quantizing."""

    def keep(record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def weight_matmuls(path: str | os.PathLike) -> list[str]:
    """Names of the MatMul nodes with a stored weight (an initializer or constant) as an input: the projections.

    The scan's products of two activations (C·B, the decays) stay fp32. Naming the nodes makes that choice explicit,
    instead of leaving it to what a quantizer version does with every MatMul by default."""
    proto = _import_onnx().load(str(path), load_external_data=False)
    stored = {i.name for i in proto.graph.initializer}
    stored |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    names = [n.name for n in proto.graph.node if n.op_type == "MatMul" and any(i in stored for i in n.input)]
    if not names or any(not name for name in names):
        raise ValueError(f"{path}: no named weight MatMul nodes to quantize; export it again with bsmamba2 export")
    return names


def _publish(tmp: str, dst: str | os.PathLike) -> None:
    """Rename the finished temporary file into place with the permissions a plain new file gets (mkstemp's are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, dst)


def _version() -> str:
    from bsmamba2 import __version__  # noqa: PLC0415

    return __version__


def _set_metadata(proto, meta: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def complex_values(proto) -> list[str]:
    """Names of graph inputs, outputs, initializers and typed values whose element type is complex (should be [])."""
    onnx = _import_onnx()
    complex_types = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}
    g = proto.graph
    typed = [*g.input, *g.output, *g.value_info]
    names = [v.name for v in typed if v.type.tensor_type.elem_type in complex_types]
    names += [t.name for t in g.initializer if t.data_type in complex_types]
    for node in g.node:  # a Cast to a complex type would make one
        for attr in node.attribute:
            if attr.name == "to" and attr.i in complex_types:
                names.append(node.name)
    return names


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The bsmamba2 metadata of an exported ONNX file; ValueError when the file is not one."""
    onnx = _import_onnx()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file {path} not found; make one with `bsmamba2 export CHECKPOINT --onnx {path}`")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf's own errors: one clear line
        raise ValueError(f"{path}: not a readable ONNX file ({err}); export one with "
                         "`bsmamba2 export CHECKPOINT --onnx FILE`") from err
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: an ONNX file, but not a bsmamba2 export (no bsmamba2 metadata); export one with "
                         "`bsmamba2 export CHECKPOINT --onnx FILE`")
    return meta


# -- execution providers --------------------------------------------------------------------------------------------
def resolve_providers(providers: Sequence[str] | str | None, device: str | None = "auto") -> list[str]:
    """The execution providers to run with, best first, from the ones this onnxruntime build has.

    `providers`: names (CPUExecutionProvider, …) or short ones (cpu, cuda, dml, coreml, rocm, …), a comma-separated
    string or a list; None picks by `device`: "cpu" runs on the CPU only, anything else takes the first accelerator
    provider present (CUDA, DirectML, CoreML, ROCm, MIGraphX) with the CPU behind it. Asking for a provider this build
    lacks is a ValueError that lists the ones it has.
    """
    ort = _import_ort()
    available = ort.get_available_providers()
    if providers is None:
        dev = str(device or "auto").lower()
        if dev == "cpu":
            return ["CPUExecutionProvider"]
        if dev.startswith("cuda"):
            providers = ["cuda", "cpu"]
        else:
            return [p for p in PREFERRED_PROVIDERS if p in available][:1] + ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [p for p in providers.split(",") if p.strip()]
    names = [PROVIDER_ALIASES.get(p.strip().lower(), p.strip()) for p in providers]
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"execution provider(s) {missing} are not in this onnxruntime build, which has {available}; "
                         "install the onnxruntime package for your hardware (onnxruntime-gpu, onnxruntime-directml, "
                         "…) or choose from those")
    if not names:
        raise ValueError(f"no execution provider given; choose from {available}")
    return list(dict.fromkeys(names))


def resolve_openvino_device(devices: Sequence[str] | str | None, device: str | None = "auto",
                            available: Sequence[str] | None = None) -> str:
    """The OpenVINO device to compile for: `devices` (CPU, GPU, GPU.1, NPU, AUTO, or a list such as "GPU,CPU", which
    becomes OpenVINO's AUTO over them, in that order); None picks by `device`: "cpu" is the CPU, anything else AUTO
    (OpenVINO's choice among those present, an Intel GPU before the CPU). A device OpenVINO does not see here is a
    ValueError that lists the ones it has. `available`: OpenVINO's devices, when the caller has a Core already."""
    if available is None:
        available = _import_openvino().Core().available_devices
    if devices is None:
        return "CPU" if str(device or "auto").lower() == "cpu" else "AUTO"
    if isinstance(devices, str):
        devices = devices.split(",")
    names = [d.strip().upper() for d in devices if d.strip()]
    if not names:
        raise ValueError(f"no OpenVINO device given; choose from {available} or AUTO")
    missing = [n for n in names if n != "AUTO" and n not in available and n.split(".")[0] not in available]
    if missing:
        raise ValueError(f"OpenVINO device(s) {missing} are not present here; OpenVINO sees {available} (and AUTO); "
                         "an Intel GPU or NPU needs its driver installed")
    return names[0] if len(names) == 1 else "AUTO:" + ",".join(names)


# -- the runtime ----------------------------------------------------------------------------------------------------
def _onnxruntime_runner(path: Path, providers, device, threads) -> tuple[Callable[[np.ndarray], np.ndarray], list]:
    """(run, where): an onnxruntime session of the file, as a function of the input array."""
    ort = _import_ort()
    where = resolve_providers(providers, device)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = int(threads)
    session = ort.InferenceSession(str(path), sess_options=options, providers=where)
    log.debug("onnxruntime session for %s on %s", path, session.get_providers())
    return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})[0], where


def _openvino_runner(path: Path, devices, device, threads) -> tuple[Callable[[np.ndarray], np.ndarray], list]:
    """(run, where): the file compiled by OpenVINO, in fp32 (no reduced-precision inference hint), as a function of
    the input array. Compiled models are cached under the package's cache (`<cache>/openvino`)."""
    ov = _import_openvino()
    from bsmamba2.pretrained import cache_dir  # noqa: PLC0415

    core = ov.Core()
    target = resolve_openvino_device(devices, device, core.available_devices)
    config = {"INFERENCE_PRECISION_HINT": "f32", "CACHE_DIR": str(cache_dir() / "openvino")}
    if threads and target == "CPU":
        config["INFERENCE_NUM_THREADS"] = int(threads)
    compiled = core.compile_model(str(path), target, config)
    request = compiled.create_infer_request()
    output = compiled.output(0)
    log.debug("OpenVINO model for %s on %s", path, target)
    return lambda x: np.asarray(request.infer({INPUT_NAME: x})[output]), [target]


class OnnxModel(nn.Module):
    """An exported network in onnxruntime or OpenVINO, usable wherever `Separator` takes a model.

    It has the attributes a model has (`config`, `stems`, `audio_channels`, `sample_rate`) and `forward_waveform`,
    which runs the package's STFT, the ONNX network and the iSTFT on segments of exactly the exported length.

    Args:
        path: an ONNX file written by `export_onnx`.
        providers: onnxruntime's execution providers (`resolve_providers`) or OpenVINO's device
            (`resolve_openvino_device`); None picks by `device`.
        device: the user's device choice ("cpu", "auto", "cuda", …), used only to pick providers.
        threads: intra-op threads (None: the runtime's default, every core).
        runtime: "onnxruntime" (default) or "openvino" (`RUNTIMES`).
        segment, checkpoint_sha256: what the file must serve (`check`), checked before a session is made.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | str | None = None,
                 device: str | None = "auto", threads: int | None = None, segment: float | None = None,
                 checkpoint_sha256: str | None = None, runtime: str = "onnxruntime"):
        super().__init__()
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown ONNX runtime {runtime!r}; choose one of {RUNTIMES}")
        self.path, self.runtime = Path(path), runtime
        self.metadata = read_metadata(self.path)
        self.config: ModelConfig = config_from_dict(json.loads(self.metadata["config"]))
        self.stems = tuple(json.loads(self.metadata["stems"]))
        self.audio_channels = int(self.metadata["audio_channels"])
        self.sample_rate = int(self.metadata["sample_rate"])
        self.segment_samples = int(self.metadata["segment_samples"])
        self.precision = self.metadata.get("precision", "fp32")
        self.check(None if segment is None else round(segment * self.sample_rate), checkpoint_sha256)
        runner = _onnxruntime_runner if runtime == "onnxruntime" else _openvino_runner
        self._run, self.providers = runner(self.path, providers, device, threads)

    def check(self, segment_samples: int | None = None, checkpoint_sha256: str | None = None) -> None:
        """ValueError when this export does not serve `segment_samples` or did not come from that checkpoint."""
        check_export(self.path, self.metadata, segment_samples, checkpoint_sha256)

    def run_spectrum(self, spec: Tensor) -> Tensor:
        """Complex mixture spectrum `(b, c, f, t)` → complex stem spectra `(b, stems, c, f, t)` by the runtime."""
        x = np.ascontiguousarray(torch.view_as_real(spec.to(torch.complex64)).cpu().numpy())
        return torch.view_as_complex(torch.from_numpy(np.ascontiguousarray(self._run(x))))

    def forward_waveform(self, wave: Tensor) -> Tensor:
        """Waveform `(b, c, segment)` → stems `(b, stems, c, segment)`, float32 on the CPU."""
        from bsmamba2.spectral import istft, stft  # noqa: PLC0415

        if wave.dim() != 3 or wave.shape[1] != self.audio_channels or wave.shape[-1] != self.segment_samples:
            raise ValueError(f"expected a waveform (batch, {self.audio_channels}, {self.segment_samples}) for "
                             f"{self.path.name}, got {tuple(wave.shape)}")
        wave = wave.detach().to("cpu", torch.float32)
        return istft(self.run_spectrum(stft(wave, self.config.stft)), self.config.stft, wave.shape[-1])

    forward = forward_waveform


def check_export(path: Path, metadata: dict[str, str], segment_samples: int | None = None,
                 checkpoint_sha256: str | None = None) -> None:
    """ValueError when the export at `path` (its `read_metadata`) does not serve `segment_samples` or did not come
    from the checkpoint with that hash; checked before any runtime loads the file."""
    exported, sr = int(metadata["segment_samples"]), int(metadata["sample_rate"])
    if segment_samples is not None and segment_samples != exported:
        raise ValueError(
            f"{path} was exported for segments of {exported} samples ({exported / sr:g} s), not {segment_samples}; "
            f"pass --segment {exported / sr:g} (Python: segment=...) or export again with "
            f"`bsmamba2 export CHECKPOINT --onnx FILE --segment {segment_samples / sr:g}`"
        )
    recorded = metadata.get("checkpoint_sha256")
    if checkpoint_sha256 is not None and recorded and recorded != checkpoint_sha256:
        raise ValueError(
            f"{path} was exported from another model (checkpoint sha256 {recorded[:12]}…, this one "
            f"{checkpoint_sha256[:12]}…); export this checkpoint with `bsmamba2 export CHECKPOINT --onnx FILE`, "
            "or leave the ONNX file out and let the backend export it"
        )


# -- where a Separator's ONNX file comes from -----------------------------------------------------------------------
def cache_path(checkpoint_sha256: str, segment_samples: int, precision: str) -> Path:
    """The cached export of a checkpoint: `<cache>/onnx/<sha256[:16]>-<segment>-<precision>[-<scheme>]-opset<N>.onnx`,
    int8 files named by their quantization scheme (`INT8_SCHEME`), so a cache written by an earlier scheme is not
    reused."""
    from bsmamba2.pretrained import cache_dir  # noqa: PLC0415

    kind = f"{precision}-{INT8_SCHEME}" if precision == "int8" else precision
    return cache_dir() / "onnx" / f"{checkpoint_sha256[:16]}-{segment_samples}-{kind}-opset{OPSET}.onnx"


def is_onnx_file(source) -> bool:
    return isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() == ".onnx"


def onnx_model(source, segment: float, *, precision: str = "fp32", providers: Sequence[str] | str | None = None,
               device: str | None = "auto", onnx_path: str | os.PathLike | None = None,
               load: Callable | None = None, sha256: Callable[[nn.Module], str] | None = None,
               runtime: str = "onnxruntime", threads: int | None = None) -> tuple[OnnxModel, Path | None]:
    """The `OnnxModel` a Separator runs, and the file that identifies it (for its manifest hash).

    Where the ONNX file comes from:
      - `source` is an .onnx file: that file, checked against the segment length.
      - `onnx_path` is given: that file, checked against the segment length and against `source`'s checkpoint hash.
      - else: the export of `source` (a checkpoint path, None for the bundled model, or a model) for this segment
        and precision from the cache (`cache_path`, keyed by the checkpoint's SHA-256), exported there first when
        missing.
    `load(source) -> (model, path)` loads a checkpoint (Separator's loader); `sha256(model)` hashes a module's weights.
    `runtime` runs the file: "onnxruntime" or "openvino", with `threads` intra-op threads (None: every core).
    """
    from bsmamba2.pretrained import sha256_file  # noqa: PLC0415

    # both packages the runtime needs, before any work, with the install line of its extra
    if runtime == "openvino":
        _import_onnx(OPENVINO_HINT)
        _import_openvino()
    else:
        _import_onnx()
        _import_ort()
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not available with the {runtime} backend; use fp32 or int8")
    if segment <= 0:
        raise ValueError(f"the {runtime} backend runs fixed-length segments; pass --segment > 0 (e.g. 8)")
    if is_onnx_file(source):
        onnx_path, source = Path(source), None
    if onnx_path is not None:
        ckpt_sha = None
        if source is not None:
            ckpt_sha = sha256(source) if isinstance(source, nn.Module) else sha256_file(load(source)[1])
        onnx_path = Path(onnx_path)
        meta = read_metadata(onnx_path)
        check_export(onnx_path, meta, round(segment * int(meta["sample_rate"])), ckpt_sha)
        target = onnx_path if precision == meta.get("precision", "fp32") else _quantized(onnx_path, meta, precision)
        net = OnnxModel(target, providers=providers, device=device, segment=segment, checkpoint_sha256=ckpt_sha,
                        runtime=runtime, threads=threads)
        return net, onnx_path
    model, path = (source, None) if isinstance(source, nn.Module) else load(source)
    ckpt_sha = sha256_file(path) if path is not None else sha256(model)
    segment_samples = round(segment * model.sample_rate)
    target = cache_path(ckpt_sha, segment_samples, precision)
    if not target.is_file():
        fp32 = cache_path(ckpt_sha, segment_samples, "fp32")
        if not fp32.is_file():
            log.warning("exporting the model to ONNX for %g-s segments into %s (once per checkpoint and segment)",
                        segment, fp32)
            export_onnx(model, fp32, segment_samples, checkpoint_sha256=ckpt_sha)
        if precision == "int8":
            log.info("quantizing %s to int8 into %s", fp32.name, target)
            quantize_onnx_int8(fp32, target)
    net = OnnxModel(target, providers=providers, device=device, segment=segment, checkpoint_sha256=ckpt_sha,
                    runtime=runtime, threads=threads)
    return net, path


def _quantized(path: Path, metadata: dict[str, str], precision: str) -> Path:
    """The int8 version of the fp32 export at `path` (its `read_metadata`), from the cache (keyed by the fp32 file's
    hash), quantized there first when missing."""
    from bsmamba2.pretrained import sha256_file  # noqa: PLC0415

    if metadata.get("precision", "fp32") != "fp32":
        raise ValueError(f"{path} is {metadata['precision']}; it cannot be turned into {precision}: pass an fp32 "
                         "export (`bsmamba2 export CHECKPOINT --onnx FILE`)")
    target = cache_path(sha256_file(path), int(metadata["segment_samples"]), precision)
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        quantize_onnx_int8(path, target)
    return target
