"""Separating whole songs: chunking, overlap-add, streaming over long files, and the `Separator` API.

The model sees fixed-length segments (8 s by default, the training length). `OverlapAdd` cuts the incoming audio
into segments every `hop` samples, runs them through the model in batches and blends the outputs with a window whose
weights are divided out sample by sample, so an identity model returns its input exactly at any length and overlap.
It works block by block: only about one segment plus one batch of hops is held at a time, so memory does not grow
with the length of the file. The paper's evaluation mode is the special case of no overlap and a flat window.

`Separator` wraps a model (a name such as the default "bsmamba2-musdb", fetched once; a checkpoint path, URL or
hf:// id, resolved by `bsmamba2.pretrained`; or any `nn.Module`), converts channels and sample rates, and returns or
writes every model stem plus `instrumental` = mixture − vocals, exactly, at the input's sample rate. No file-format
code lives here: `bsmamba2.audio` does the reading and writing.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bsmamba2 import cpu_compile, switches
from bsmamba2.audio import (
    INPUT_SUBTYPE,
    LOSSY,
    AudioError,
    AudioReader,
    AudioWriter,
    StreamResampler,
    check_finite,
    downmix_to_stereo,
    encoder_options,
    resampled_length,
    resolve_format,
    subtype_for,
)
from bsmamba2.device import autocast, cpu_bf16_native, resolve_device, resolve_precision
from bsmamba2.pretrained import model_from_file, resolve, sha256_file
from bsmamba2.quantize import linear_bf16, quantize_linear_int8

log = logging.getLogger(__name__)

MODES = ("overlap-add", "paper")
BACKENDS = ("torch", "onnxruntime", "openvino")  # the last two run an ONNX export (`bsmamba2.onnx_backend`)
DEFAULT_TEMPLATE = "{track}/{stem}.{ext}"
INSTRUMENTAL = "instrumental"
READ_BLOCK_SECONDS = 10.0

# A model callable: (batch, channels, time) float32 -> (batch, stems, channels, time) float32.
ModelFn = Callable[[torch.Tensor], torch.Tensor]


def overlap_window(length: int, overlap: int) -> torch.Tensor:
    """Blending weights for one segment: linear ramps over `overlap` samples at each end, flat in the middle.

    Every weight is > 0 (the ramps start at 1/(overlap+1)), so the sum of weights is positive at every sample and
    dividing by it is always defined. Returns float64 (length,).
    """
    if overlap <= 0:
        return torch.ones(length, dtype=torch.float64)
    i = torch.arange(length, dtype=torch.float64)
    ramp = float(overlap + 1)
    return torch.minimum(torch.minimum((i + 1) / ramp, (length - i) / ramp), torch.ones(()))


class OverlapAdd:
    """Apply `fn` to a stream of (channels, n) blocks in segments, blending overlapping outputs.

    Segment k covers [k·hop, k·hop + segment); the last ones are zero-padded past the end. Outputs are accumulated in
    float64 as Σ w·y together with Σ w, and each sample is released as Σ w·y / Σ w once no later segment can touch it,
    so an identity `fn` gives back the input bit for bit (the float64 ratio rounds back to the float32 input).

    Args:
        fn: (batch, channels, segment) -> (batch, stems, channels, segment).
        channels, stems: sizes of the input and output.
        segment: samples per segment; 0 = run `fn` once on the whole input at `finish()` (memory grows with length).
        hop: samples between segment starts, 1..segment (segment = no overlap).
        batch_size: segments per `fn` call.
        min_length: whole-input mode zero-pads shorter inputs to this length (the STFT needs n_fft // 2 + 1 samples).
        window: "linear" ramps (`overlap_window`) or "rect" (flat; the paper's mode).
    """

    def __init__(
        self, fn: ModelFn, channels: int, stems: int, segment: int, hop: int | None = None, batch_size: int = 1,
        min_length: int = 1, window: str = "linear",
    ):  # fmt: skip
        if segment < 0:
            raise ValueError(f"segment must be >= 0 samples, got {segment}")
        hop = segment if hop is None else hop
        if segment and not 1 <= hop <= segment:
            raise ValueError(f"hop must be in 1..{segment} samples, got {hop}")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.fn, self.channels, self.stems = fn, channels, stems
        self.segment, self.hop, self.batch_size, self.min_length = segment, hop, batch_size, max(1, min_length)
        if segment:
            self.window = overlap_window(segment, segment - hop) if window == "linear" else torch.ones(segment, dtype=torch.float64)
        self.total_in = 0  # samples pushed so far
        self._buf = torch.zeros(channels, 0)  # (channels, n) input from absolute sample `_buf_start`
        self._buf_start = 0
        self._next = 0  # index of the next segment to run
        self._acc = torch.zeros(stems, channels, 0, dtype=torch.float64)  # Σ w·y from absolute sample `_out_start`
        self._wsum = torch.zeros(0, dtype=torch.float64)  # Σ w
        self._out_start = 0
        self._finished = False

    # -- public --------------------------------------------------------------------------------------------------
    def push(self, block: torch.Tensor) -> torch.Tensor:
        """Add a (channels, n) block; return the outputs now final, (stems, channels, m) float32 (m may be 0)."""
        if self._finished:
            raise RuntimeError("OverlapAdd.push() after finish()")
        if block.ndim != 2 or block.shape[0] != self.channels:
            raise ValueError(f"expected a ({self.channels}, time) block, got shape {tuple(block.shape)}")
        block = block.to(torch.float32)
        self._buf = torch.cat([self._buf, block], dim=-1) if self._buf.shape[-1] else block
        self.total_in += block.shape[-1]
        if not self.segment:
            return self._empty()
        while True:
            ready = []
            k = self._next
            while len(ready) < self.batch_size and k * self.hop + self.segment <= self.total_in:
                ready.append(k)
                k += 1
            if len(ready) < self.batch_size:
                break  # wait for a full batch (or `finish`)
            self._run(ready)
        return self._release(self._next * self.hop)

    def finish(self) -> torch.Tensor:
        """Run the remaining (zero-padded) segments; return the rest of the output, (stems, channels, m)."""
        if self._finished:
            raise RuntimeError("OverlapAdd.finish() called twice")
        self._finished = True
        total = self.total_in
        if total == 0:
            return self._empty()
        if not self.segment:
            x = self._buf
            if x.shape[-1] < self.min_length:
                x = torch.nn.functional.pad(x, (0, self.min_length - x.shape[-1]))
            y = self._call(x[None])[0, ..., :total]  # (stems, channels, total)
            self._buf = self._buf[:, :0]
            return y.contiguous()
        pending = []
        k = self._next
        while k == 0 or (k - 1) * self.hop + self.segment < total:
            pending.append(k)
            k += 1
        for i in range(0, len(pending), self.batch_size):
            self._run(pending[i : i + self.batch_size])
        return self._release(total)

    # -- internals -----------------------------------------------------------------------------------------------
    def _empty(self) -> torch.Tensor:
        return torch.zeros(self.stems, self.channels, 0)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fn(x)
        expected = (x.shape[0], self.stems, self.channels, x.shape[-1])
        if tuple(y.shape) != expected:
            raise RuntimeError(f"model returned shape {tuple(y.shape)} for input {tuple(x.shape)}; expected {expected}")
        return y.to(torch.float32)

    def _run(self, ks: list[int]) -> None:
        seg = self.segment
        chunks = []
        for k in ks:
            a = k * self.hop - self._buf_start
            chunk = self._buf[:, a : a + seg]
            if chunk.shape[-1] < seg:  # past the end of the input: zero-pad
                chunk = torch.nn.functional.pad(chunk, (0, seg - chunk.shape[-1]))
            chunks.append(chunk)
        y = self._call(torch.stack(chunks))  # (batch, stems, channels, segment)
        end = ks[-1] * self.hop + seg - self._out_start
        if end > self._wsum.shape[0]:
            grow = end - self._wsum.shape[0]
            self._acc = torch.cat([self._acc, self._acc.new_zeros(self.stems, self.channels, grow)], dim=-1)
            self._wsum = torch.cat([self._wsum, self._wsum.new_zeros(grow)])
        for i, k in enumerate(ks):
            a = k * self.hop - self._out_start
            self._acc[..., a : a + seg] += y[i].to(torch.float64) * self.window
            self._wsum[a : a + seg] += self.window
        self._next = ks[-1] + 1
        # Input before the next segment's start is never read again.
        drop = self._next * self.hop - self._buf_start
        if drop > 0:
            self._buf = self._buf[:, drop:]
            self._buf_start += drop

    def _release(self, upto: int) -> torch.Tensor:
        """Emit output samples [_out_start, upto) — all segments that touch them have run."""
        n = min(upto - self._out_start, self._wsum.shape[0])
        if n <= 0:
            return self._empty()
        wsum = self._wsum[:n]
        if bool((wsum <= 0).any()):  # cannot happen with a positive window; guards the division
            raise RuntimeError("overlap-add left samples without weight; this is a bug in bsmamba2.separate")
        out = (self._acc[..., :n] / wsum).to(torch.float32)
        self._acc = self._acc[..., n:]
        self._wsum = self._wsum[n:]
        self._out_start += n
        return out


class _Fifo:
    """A (channels, time) queue of tensors."""

    def __init__(self, channels: int):
        self.data = torch.zeros(channels, 0)

    def __len__(self) -> int:
        return self.data.shape[-1]

    def put(self, x: torch.Tensor) -> None:
        if x.shape[-1]:
            self.data = torch.cat([self.data, x], dim=-1) if len(self) else x

    def take(self, n: int) -> torch.Tensor:
        out, self.data = self.data[:, :n], self.data[:, n:]
        return out

    def pad_to(self, n: int) -> None:
        if len(self) < n:
            self.data = torch.nn.functional.pad(self.data, (0, n - len(self)))


def _module_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class FileResult:
    """What `Separator.separate_file` did for one input."""

    outputs: dict[str, Path]
    duration: float  # seconds of audio
    elapsed: float  # seconds taken
    sample_rate: int
    channels: int

    @property
    def rtf(self) -> float:
        """Real-time factor: seconds taken per second of audio (below 1 = faster than real time)."""
        return self.elapsed / self.duration if self.duration else float("nan")


class Separator:
    """Separate songs with a BSMamba2 (or BS-RoFormer) model.

    Args:
        model: a model name — "bsmamba2-musdb" (the default: the paper's weights, downloaded into the cache on first
            use), "bsroformer-musdb", "demo" (the small bundled model) —, a checkpoint path (official Lightning .ckpt
            or bsmamba2 .safetensors), a URL, "hf://OWNER/REPO[/FILE]", or a model (`nn.Module` with
            `forward_waveform` or a forward taking (batch, channels, time) waveforms to (batch, stems, channels,
            time)). See `bsmamba2.pretrained.resolve`.
        device: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N", "mps" or a torch.device.
        precision: None (the device's default), "fp32", "bf16", "fp16" (a GPU's autocast; fp16 needs a GPU) or
            "int8" (CPU). On a CPU, "bf16" runs the Linear projections in bfloat16 and everything else in float32
            (`bsmamba2.quantize`), and it is the default (None) for a model loaded by name, path or URL where the
            CPU multiplies bf16 natively (`bsmamba2.device.cpu_bf16_native`; uSDR within 0.03 dB of fp32 for the
            bundled model, benchmarks/RESULTS.md "cpu-precision-sdr"); elsewhere the default is fp32.
        segment: seconds per model call (the training length is 8 s); 0 = the whole input at once.
        overlap: fraction of a segment shared with the next one, 0 <= overlap < 1 (overlap-add mode).
        batch_size: segments per model call; None picks 1 on a CPU (lowest memory; larger batches gain little there)
            and 8 on a GPU.
        mode: "overlap-add" (default) or "paper" — the paper's evaluation: non-overlapping segments concatenated.
        checkpoint: the former name of `model`, still accepted.
        offline: never use the network (default: $BSMAMBA2_OFFLINE); a model missing from the cache is an error.
        progress: show a progress bar while downloading a model.
        backend: "torch" (default), "onnxruntime" or "openvino": the network runs as an ONNX export in that runtime
            (`bsmamba2.onnx_backend.onnx_model` says where the file comes from: an .onnx `model`, `onnx`, or an
            export of the model cached per checkpoint hash and segment). Precision there: fp32 or int8. An .onnx
            `model` with backend "torch" runs in onnxruntime.
        providers: onnxruntime execution providers (e.g. ["cuda", "cpu"]) or the OpenVINO device ("CPU", "GPU",
            "NPU", "AUTO"); None picks by `device`.
        onnx: with backend "onnxruntime" or "openvino", an ONNX export of `model` to run (checked against it).
        compile: CPU inference through `torch.compile` (`bsmamba2.cpu_compile`): "auto" (inputs of a minute or more,
            when a C++ compiler is found), "on" or "off"; default $BSMAMBA2_CPU_COMPILE, else "auto". Same output
            to float rounding (bit-identical results across runs, e.g. a catalog against single files, need
            "off"); the first segment of each new shape pays the compile (tens of seconds, then cached).

    precision "int8" (CPU) quantizes the Linear projections dynamically to int8 (`bsmamba2.quantize`).
    """

    def __init__(
        self, model: str | os.PathLike | nn.Module | None = None, device: str | torch.device = "auto",
        precision: str | torch.dtype | None = None, segment: float = 8.0, overlap: float = 0.5, batch_size: int | None = None,
        mode: str = "overlap-add", *, checkpoint: str | os.PathLike | nn.Module | None = None,
        offline: bool | None = None, progress: bool = True, backend: str = "torch",
        providers: Iterable[str] | str | None = None, onnx: str | os.PathLike | None = None,
        compile: str | None = None,
    ):  # fmt: skip
        if checkpoint is not None:
            if model is not None:
                raise ValueError("give the model once: `model` and its old name `checkpoint` are the same argument")
            model = checkpoint
        self.compile = cpu_compile.check_mode(compile or switches.cpu_compile())
        self._compiling = False  # set per input by `stream`
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        if not (segment >= 0 and math.isfinite(segment)):
            raise ValueError(f"segment must be >= 0 seconds (0 = whole file at once), got {segment}")
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")

        def load(spec) -> tuple[nn.Module, Path]:  # a model name, path or URL -> (model, its file)
            path = resolve(spec, offline=offline, progress=progress)
            return model_from_file(path), path

        int8 = str(precision).lower() == "int8"
        self.device = resolve_device("cpu" if int8 and device == "auto" else device)  # int8 kernels are CPU ones
        is_onnx = isinstance(model, (str, os.PathLike)) and Path(model).suffix.lower() == ".onnx"
        self.backend = "onnxruntime" if is_onnx and backend == "torch" else backend
        cpu_torch = self.device.type == "cpu" and self.backend == "torch"
        if precision is None and cpu_torch and not isinstance(model, nn.Module) and cpu_bf16_native():
            precision = "bf16"
            log.info("CPU: Linear projections in bf16 (this CPU multiplies bf16 natively); --precision fp32 for "
                     "float32 throughout")
        self.dtype = resolve_precision(None if int8 else precision, self.device)
        # a CPU's bf16: reduced-precision projections in a copy of the model, no autocast
        self.bf16_projections = cpu_torch and self.dtype == torch.bfloat16
        self._autocast_dtype = torch.float32 if self.bf16_projections else self.dtype
        if self.backend != "torch":  # the network callable is an ONNX runtime's (bsmamba2.onnx_backend)
            from bsmamba2.onnx_backend import onnx_model  # noqa: PLC0415

            if self.dtype != torch.float32:
                raise ValueError(f"the {self.backend} backend runs fp32 or int8; drop --precision or use one of those")
            self.model, self.checkpoint_path = onnx_model(
                model, segment, precision="int8" if int8 else "fp32", providers=providers, device=str(device),
                onnx_path=onnx, load=load, sha256=_module_sha256, runtime=self.backend,
            )  # fmt: skip
            self.device = torch.device("cpu")  # where the STFT runs; the session places its own work
        elif isinstance(model, nn.Module):
            self.model, self.checkpoint_path = model, None
        else:
            self.model, self.checkpoint_path = load(model)
            if model is not None and os.fspath(model) == "demo":
                log.info("model: the bundled demo model, trained on synthetic songs only; for real music use the "
                         "default, bsmamba2-musdb (the paper's weights)")
        if int8 and self.backend == "torch":
            if self.device.type != "cpu":
                raise ValueError("--precision int8 runs on the CPU; pass --device cpu")
            self.model = quantize_linear_int8(self.model)
        elif self.bf16_projections:
            self.model = linear_bf16(self.model)
        self.int8 = int8
        self.model = self.model.to(self.device).eval()
        self.stems: tuple[str, ...] = tuple(getattr(self.model, "stems", ("vocals",)))
        self.audio_channels: int = int(getattr(self.model, "audio_channels", 2))
        self.sample_rate: int = int(getattr(self.model, "sample_rate", 44100))
        stft = getattr(getattr(self.model, "config", None), "stft", None)
        # The STFT reflect-pads n_fft // 2 samples at each end, which needs at least that many + 1 samples.
        self.min_length = int(getattr(stft, "n_fft", 2048)) if stft is not None else 1
        self.mode = mode
        self.segment = float(segment)
        self.overlap = 0.0 if mode == "paper" else float(overlap)
        self.batch_size = int(batch_size) if batch_size is not None else (1 if self.device.type == "cpu" else 8)
        self.segment_samples = int(round(self.segment * self.sample_rate))
        if self.segment and self.segment_samples < self.min_length:
            raise ValueError(
                f"segment {segment} s is shorter than the model's {self.min_length}-sample STFT window; "
                f"use at least {self.min_length / self.sample_rate:.3f} s (or 0 for the whole file)"
            )
        self.hop_samples = max(1, int(round(self.segment_samples * (1.0 - self.overlap)))) if self.segment else 0
        self._checkpoint_sha256: str | None = None

    # -- description ---------------------------------------------------------------------------------------------
    @property
    def output_stems(self) -> tuple[str, ...]:
        """Every model stem, plus "instrumental" (mixture − vocals) when the model has vocals."""
        return self.stems + ((INSTRUMENTAL,) if "vocals" in self.stems and INSTRUMENTAL not in self.stems else ())

    @property
    def checkpoint_sha256(self) -> str:
        """SHA-256 of the checkpoint file (or of the model's weights when a module was given)."""
        if self._checkpoint_sha256 is None:
            if self.checkpoint_path is not None:
                self._checkpoint_sha256 = sha256_file(self.checkpoint_path)
            else:
                self._checkpoint_sha256 = _module_sha256(self.model)
        return self._checkpoint_sha256

    @property
    def precision_name(self) -> str:
        """The precision in words, for messages: "fp32", "int8 projections", "bf16 projections" (a CPU's bf16), or
        "bf16"/"fp16" (autocast)."""
        if self.int8:
            return "int8 projections"
        name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        return f"{name} projections" if self.bf16_projections else name

    def settings(self) -> dict:
        """The settings that change the output, as recorded in a manifest."""
        settings = {
            "mode": self.mode, "segment": self.segment, "overlap": self.overlap,
            "precision": "int8" if self.int8 else str(self.dtype).replace("torch.", ""),
        }  # fmt: skip
        if self.backend != "torch":  # only then, so manifests of torch runs keep their settings
            settings["backend"] = self.backend
        return settings

    # -- model call ----------------------------------------------------------------------------------------------
    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, channels, time) float32 -> (batch, stems, channels, time) float32 on the CPU."""
        return self.apply_on_device(x).cpu()

    def apply_on_device(self, x: torch.Tensor) -> torch.Tensor:
        """The model call: (batch, channels, time) float32 -> (batch, stems, channels, time) float32, left on the
        model's device so that a caller can overlap the copy back with other work (`bsmamba2.catalog` does).

        Mono input to a stereo model is duplicated and the outputs averaged back to mono; a mono model runs each
        channel of a stereo input as its own batch item.
        """
        batch, channels, length = x.shape
        m = self.audio_channels
        x = x.to(self.device)
        if channels == m:
            inp = x
        elif channels == 1:
            inp = x.expand(batch, m, length)
        elif m == 1:
            inp = x.reshape(batch * channels, 1, length)  # (b·c, 1, t)
        else:
            raise ValueError(f"a {m}-channel model cannot separate {channels}-channel audio")
        forward = getattr(self.model, "forward_waveform", None) or self.model
        with torch.inference_mode(), autocast(self.device, self._autocast_dtype), cpu_compile.enabled(self._compiling):
            y = forward(inp)
        y = y.float()
        if channels == m:
            pass
        elif channels == 1:
            y = y.mean(dim=2, keepdim=True)  # (b, s, 1, t)
        else:
            y = y.reshape(batch, channels, y.shape[1], length).transpose(1, 2)  # (b, s, c, t)
        return y

    def plan_compile(self, seconds: float | None) -> bool:
        """Decide whether the next model calls run compiled, for `seconds` of input to come (see `compile`; None:
        unknown). `stream` decides per input; `bsmamba2.catalog` once for its whole library."""
        # with bf16 projections the compiled block is slower than the eager one (RESULTS.md "cpu-bf16"): "auto"
        # leaves them eager, "on" still compiles
        eager_bf16 = self.compile == "auto" and self.bf16_projections
        self._compiling = (self.backend == "torch" and not self.int8 and not eager_bf16
                           and cpu_compile.wanted(self.compile, self.device, seconds))
        return self._compiling

    def with_model_call(self, fn: ModelFn) -> "Separator":
        """A shallow copy that sends its segments to `fn` instead of the model, with the same chunking, resampling,
        blending and writing. `fn` must return what `apply_on_device(x).cpu()` would; `bsmamba2.catalog` uses it to
        pool the segments of many files into each model call."""
        other = copy.copy(self)
        other._apply = fn
        return other

    def _engine(self, channels: int) -> OverlapAdd:
        return OverlapAdd(
            self._apply, channels, len(self.stems), self.segment_samples, self.hop_samples or None, self.batch_size,
            min_length=self.min_length, window="rect" if self.mode == "paper" else "linear",
        )  # fmt: skip

    # -- streaming core ------------------------------------------------------------------------------------------
    def stream(
        self, blocks: Iterable[torch.Tensor], sample_rate: int, channels: int, output_sample_rate: int | None = None,
        name: str = "waveform", progress: Callable[[float], None] | None = None, seconds: float | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:  # fmt: skip
        """Separate audio arriving as (channels, n) blocks; yield dicts of (channels, m) output blocks.

        Each yielded dict has every name of `output_stems`, all blocks the same length, at `output_sample_rate`
        (default: `sample_rate`); concatenated they have the input's duration and sum (vocals + instrumental) to the
        mixture. `progress(seconds)` is called with the audio seconds finished by each yield. `seconds`: the input's
        expected duration, if known (`compile="auto"` compiles for long inputs only).
        """
        self.plan_compile(seconds)
        in_sr = int(sample_rate)
        out_sr = int(output_sample_rate or in_sr)
        if in_sr <= 0 or out_sr <= 0:
            raise ValueError(f"sample rates must be positive, got {in_sr} and {out_sr}")
        n_stems = len(self.stems)
        to_model = StreamResampler(in_sr, self.sample_rate, channels)
        mix_to_out = StreamResampler(in_sr, out_sr, channels)
        stems_to_out = StreamResampler(self.sample_rate, out_sr, n_stems * channels)
        engine = self._engine(channels)
        mix_q, stem_q = _Fifo(channels), _Fifo(n_stems * channels)
        vocals = self.stems.index("vocals") if "vocals" in self.stems else None
        emitted = 0
        total_in = 0

        def take(n: int) -> dict[str, torch.Tensor]:
            nonlocal emitted
            mix = mix_q.take(n)
            ys = stem_q.take(n).reshape(n_stems, channels, n)
            out = {stem: ys[i] for i, stem in enumerate(self.stems)}
            if INSTRUMENTAL in self.output_stems:
                out[INSTRUMENTAL] = mix - ys[vocals]
            emitted += n
            if progress is not None:
                progress(n / out_sr)
            return out

        def separated(x: torch.Tensor, last: bool = False) -> None:
            ys = engine.finish() if last else engine.push(x)  # (stems, channels, m) at the model's rate
            stem_q.put(stems_to_out(ys.reshape(n_stems * channels, -1), last=last))

        for block in blocks:
            if block.ndim != 2 or block.shape[0] != channels:
                raise ValueError(f"{name}: expected ({channels}, time) blocks, got shape {tuple(block.shape)}")
            block = block.to(torch.float32)
            check_finite(block, name, total_in / in_sr, in_sr)
            total_in += block.shape[-1]
            mix_q.put(mix_to_out(block))
            separated(to_model(block))
            # Output samples below this index belong to the final output, whatever length the input turns out to be.
            safe = total_in if in_sr == out_sr else math.floor(total_in * out_sr / in_sr)
            n = min(len(mix_q), len(stem_q), safe - emitted)
            if n > 0:
                yield take(n)
        if total_in == 0:
            raise AudioError(f"{name}: contains no audio samples; nothing to separate")
        separated(to_model.flush())
        separated(None, last=True)
        mix_q.put(mix_to_out.flush())
        final = resampled_length(total_in, in_sr, out_sr)
        mix_q.pad_to(final - emitted)  # resamplers may end a sample short of the nominal length
        stem_q.pad_to(final - emitted)
        if final - emitted > 0:
            yield take(final - emitted)

    # -- in memory -----------------------------------------------------------------------------------------------
    def separate(
        self, waveform: torch.Tensor | np.ndarray, sample_rate: int, output_sample_rate: int | None = None,
        downmix: bool = False, progress: Callable[[float], None] | None = None,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Separate an in-memory waveform.

        Args:
            waveform: (channels, time) or (time,) float audio, mono or stereo (more channels need `downmix=True`).
            sample_rate: its sample rate; it is resampled to the model's rate and back.
            progress: called with the audio seconds finished, as they finish (e.g. a progress bar's `update`).
        Returns:
            {stem: (channels, time) float32 tensor} for every model stem plus "instrumental" (mixture − vocals), at
            `output_sample_rate` (default: the input's rate) with the input's channel count.
        """
        wave = torch.as_tensor(waveform).detach().to("cpu", torch.float32)
        if wave.ndim == 1:
            wave = wave[None]
        if wave.ndim != 2:
            raise ValueError(f"expected a (channels, time) waveform, got shape {tuple(wave.shape)}")
        wave = self._check_channels(wave, "waveform", downmix)
        if wave.shape[-1] == 0:
            raise AudioError("waveform: contains no audio samples; nothing to separate")
        block = max(1, int(READ_BLOCK_SECONDS * sample_rate))
        parts: dict[str, list[torch.Tensor]] = {stem: [] for stem in self.output_stems}
        blocks = (wave[:, i : i + block] for i in range(0, wave.shape[-1], block))
        seconds = wave.shape[-1] / sample_rate
        for out in self.stream(blocks, sample_rate, wave.shape[0], output_sample_rate, progress=progress,
                               seconds=seconds):
            for stem, y in out.items():
                parts[stem].append(y)
        return {stem: torch.cat(ys, dim=-1) for stem, ys in parts.items()}

    def _check_channels(self, wave: torch.Tensor, name: str, downmix: bool) -> torch.Tensor:
        if wave.shape[0] > 2:
            if not downmix:
                raise AudioError(
                    f"{name}: has {wave.shape[0]} channels; BSMamba2 separates mono or stereo audio — "
                    "pass --downmix (Python: downmix=True) to fold it to stereo first"
                )
            return downmix_to_stereo(wave)
        if wave.shape[0] == 0:
            raise AudioError(f"{name}: has no channels")
        return wave

    # -- files ---------------------------------------------------------------------------------------------------
    def output_paths(
        self, path: str | os.PathLike, out_dir: str | os.PathLike, template: str = DEFAULT_TEMPLATE,
        ext: str = "wav", stems: Iterable[str] | None = None,
    ) -> dict[str, Path]:  # fmt: skip
        """Where `separate_file` writes each stem of `path`.

        The template is relative to `out_dir` and may use {track} (file name without ending), {filename} (with it),
        {stem}, {ext} and {parent} (the name of the input's folder).
        """
        path = Path(path)
        stems = self._select(stems)
        if "{stem}" not in template:
            raise ValueError(f"output template {template!r} must contain {{stem}}, or all stems land in one file")
        out = {}
        for stem in stems:
            try:
                rel = template.format(track=path.stem, filename=path.name, stem=stem, ext=ext,
                                      parent=path.resolve().parent.name)
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(
                    f"bad output template {template!r} ({err}); "
                    "use the fields {track}, {filename}, {stem}, {ext}, {parent}"
                ) from None
            out[stem] = Path(out_dir) / rel
        return out

    def _select(self, stems: Iterable[str] | None) -> tuple[str, ...]:
        if stems is None:
            return self.output_stems
        stems = tuple(stems)
        unknown = [s for s in stems if s not in self.output_stems]
        if unknown:
            raise ValueError(f"unknown stem(s) {unknown}; this model gives {list(self.output_stems)}")
        return stems

    def separate_file(
        self, path: str | os.PathLike, out_dir: str | os.PathLike, template: str = DEFAULT_TEMPLATE,
        format: str = "wav", subtype: str | None = None, sample_rate: int | None = None, downmix: bool = False,
        stems: Iterable[str] | None = None, progress: Callable[[float], None] | None = None,
        bitrate: int | None = None,
    ) -> dict[str, Path]:  # fmt: skip
        """Separate an audio file block by block and write each stem; returns {stem: output path}.

        Memory does not grow with the file's length (except with segment=0). Outputs are written to temporary files
        and renamed only when all are complete, so an error or interruption leaves no partial file. `format`: wav,
        flac, aiff, mp3 or ogg; `subtype` (wav, flac, aiff): PCM_16, PCM_24, PCM_32 or FLOAT, by default (None or
        "INPUT") the input's depth (`audio.subtype_for`: 24-bit and float inputs give 24-bit and float stems);
        `bitrate` (mp3): kbit/s, 320 by default.
        """
        return self.separate_file_result(
            path, out_dir, template, format, subtype, sample_rate, downmix, stems, progress, bitrate
        ).outputs

    def separate_file_result(
        self, path: str | os.PathLike, out_dir: str | os.PathLike, template: str = DEFAULT_TEMPLATE,
        format: str = "wav", subtype: str | None = None, sample_rate: int | None = None, downmix: bool = False,
        stems: Iterable[str] | None = None, progress: Callable[[float], None] | None = None,
        bitrate: int | None = None,
    ) -> FileResult:  # fmt: skip
        """`separate_file`, also returning duration, time taken and real-time factor."""
        path = Path(path)
        start = time.perf_counter()
        follow_input = subtype is None or str(subtype).upper() == INPUT_SUBTYPE
        fmt, subtype = resolve_format(f"x.{format}", format, None if follow_input else subtype)
        encoder_options(fmt, bitrate)  # a bad bitrate fails before the input is read
        targets = self.output_paths(path, out_dir, template, format.lower(), stems)
        with AudioReader(path, check=False) as reader:  # `stream` checks every block for NaN/Inf
            info = reader.info
            if info.frames == 0 and info.frames_exact:
                raise AudioError(f"{path}: contains no audio samples; nothing to separate")
            if info.channels > 2 and not downmix:
                self._check_channels(torch.zeros(info.channels, 0), str(path), downmix)
            channels = min(info.channels, 2)
            if follow_input and fmt not in LOSSY:
                subtype = subtype_for(fmt, info.subtype)
            out_sr = int(sample_rate or info.sample_rate)
            reader.block_frames = max(1, int(READ_BLOCK_SECONDS * info.sample_rate))
            blocks = (self._check_channels(b, str(path), downmix) for b in reader)
            writers: dict[str, AudioWriter] = {}
            new_dirs = _missing_parents(targets.values(), Path(out_dir))
            try:
                for stem, target in targets.items():
                    writers[stem] = AudioWriter(target, out_sr, channels, subtype=subtype, format=format,
                                                bitrate=bitrate)
                seconds = info.frames / info.sample_rate if info.frames else None
                for out in self.stream(blocks, info.sample_rate, channels, out_sr, name=str(path), progress=progress,
                                       seconds=seconds):
                    for stem, writer in writers.items():
                        writer.write(out[stem])
                frames_in = reader.frames_read
            except BaseException:
                for writer in writers.values():
                    writer.abort()
                for folder in sorted(new_dirs, key=lambda d: len(d.parts), reverse=True):
                    with contextlib.suppress(OSError):
                        folder.rmdir()  # only if empty: folders this call created for its outputs
                raise
        outputs = {stem: writer.commit() for stem, writer in writers.items()}
        elapsed = time.perf_counter() - start
        return FileResult(outputs, frames_in / info.sample_rate, elapsed, out_sr, channels)


def _missing_parents(paths: Iterable[Path], root: Path) -> set[Path]:
    """Folders between `root` (exclusive) and each path that do not exist yet."""
    missing = set()
    root = root.resolve()
    for path in paths:
        folder = path.resolve().parent
        while folder != root and folder != folder.parent and not folder.exists():
            missing.add(folder)
            folder = folder.parent
    return missing


# -- batch runs: manifest and resume ---------------------------------------------------------------------------------
MANIFEST_NAME = "manifest.json"


class Manifest:
    """`OUT_DIR/manifest.json`: per input, its hash, the checkpoint hash, the settings, outputs, timing and status.

    It is rewritten atomically after every change, so an interrupted batch run can resume: inputs whose entry is
    "done" with the same input hash, checkpoint and settings, and whose outputs exist, are skipped.
    """

    VERSION = 1

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / MANIFEST_NAME
        self.files: dict[str, dict] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self.files = dict(data.get("files", {}))
            except (OSError, ValueError, AttributeError) as err:
                log.warning("%s is unreadable (%s); starting a new manifest", self.path, err)

    @staticmethod
    def key(path: str | os.PathLike) -> str:
        return str(Path(path).resolve())

    def get(self, path: str | os.PathLike) -> dict | None:
        return self.files.get(self.key(path))

    def input_sha256(self, path: str | os.PathLike) -> str:
        """The input's SHA-256, reused from the manifest when size and modification time are unchanged."""
        st = Path(path).stat()
        entry = self.get(path)
        if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns and entry.get("input_sha256"):
            return entry["input_sha256"]
        return sha256_file(path)

    def update(self, path: str | os.PathLike, **fields) -> None:
        st = Path(path).stat() if Path(path).exists() else None
        entry = self.files.setdefault(self.key(path), {})
        entry.update(fields)
        if st is not None:
            entry.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        entry["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.part")
        tmp.write_text(json.dumps({"version": self.VERSION, "files": self.files}, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.path)

    def is_done(self, path, input_sha256: str, checkpoint_sha256: str, settings: dict, outputs: dict[str, Path]) -> bool:
        """True when `path` was separated to `outputs` with the same input, checkpoint and settings."""
        entry = self.get(path)
        return bool(
            entry
            and entry.get("status") == "done"
            and entry.get("input_sha256") == input_sha256
            and entry.get("checkpoint_sha256") == checkpoint_sha256
            and entry.get("settings") == settings
            and all(Path(p).exists() for p in outputs.values())
        )
