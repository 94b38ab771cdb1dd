"""Shared test fixtures: paths to ../shared, seeds, tiny configs, synthetic audio, and the `gpu` marker."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BSMAMBA2_SHARED", ROOT.parent / "shared"))
OFFICIAL = SHARED / "fixtures" / "official"
SAMPLE_ROOT = SHARED / "data" / "musdb18hq-sample"
SAMPLE_TRACK = SAMPLE_ROOT / "train" / "Music Delta - 80s Rock"
ONNX_SEGMENT = 1.0  # seconds per segment of the ONNX exports in tests: 101 STFT frames, two 64-frame scan chunks

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.exists():
        pytest.fail(f"shared fixtures not found at {SHARED}; set BSMAMBA2_SHARED to the shared/ folder")
    return SHARED


@pytest.fixture(scope="session")
def official_ckpt(shared_dir) -> Path:
    return OFFICIAL / "official_tiny_a.ckpt"


@pytest.fixture(scope="session")
def official_io(shared_dir) -> dict:
    with np.load(OFFICIAL / "official_tiny_a_io.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def sample_track(shared_dir) -> Path:
    return SAMPLE_TRACK


@pytest.fixture
def noise_audio():
    """Three seconds of stereo noise at 44.1 kHz, (channels, time) float32."""
    return 0.1 * torch.randn(2, 3 * 44100)


@pytest.fixture(scope="session")
def tiny_musdb(tmp_path_factory, sample_track) -> Path:
    """A MUSDB18-HQ-layout root cut from the shared sample track: train/ has three 2.5-s tracks plus one named as a
    track of the paper's validation split ("Actions - One Minute Smile"); test/ has one. In "Cut B" the vocals are
    silent for the first 1.2 s. Stems are PCM16 WAV; mixture.wav is the sum of the stems."""
    import soundfile as sf

    sr = 44100
    stems = {s: sf.read(str(sample_track / f"{s}.wav"), dtype="float32")[0] for s in ("vocals", "drums", "bass", "other")}
    root = tmp_path_factory.mktemp("tiny_musdb")
    cuts = {"train/Cut A": 0.0, "train/Cut B": 2.0, "train/Cut C": 4.0,
            "train/Actions - One Minute Smile": 1.0, "test/Cut D": 3.0}
    for name, offset in cuts.items():
        folder = root / name
        folder.mkdir(parents=True)
        start = int(offset * sr)
        parts = {s: a[start : start + int(2.5 * sr)].copy() for s, a in stems.items()}  # (time, channels)
        if name == "train/Cut B":
            parts["vocals"][: int(1.2 * sr)] = 0.0
        for s, a in parts.items():
            sf.write(str(folder / f"{s}.wav"), a, sr, subtype="PCM_16")
        sf.write(str(folder / "mixture.wav"), np.clip(sum(parts.values()), -1, 1), sr, subtype="PCM_16")
    return root


@pytest.fixture(scope="session")
def official_onnx(tmp_path_factory, official_ckpt) -> Path:
    """The official fixture checkpoint exported by `bsmamba2 export --onnx` for 1-s segments (`ONNX_SEGMENT`), once
    per test session: tracing is what costs time, so the tests of both ONNX runtimes share this file."""
    pytest.importorskip("onnx")
    from bsmamba2 import cli  # noqa: PLC0415

    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    assert cli.main(["export", str(official_ckpt), "--onnx", str(path), "--segment", str(ONNX_SEGMENT)]) == 0
    return path


def max_rel(a, b) -> float:
    """max |a - b| / max |b| (the ONNX tests' measure of agreement)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="session")
def tool_script():
    """Loads a script of tools/ as a module, `tool_script("ab_scan")`, with tools/ on the import path as when the
    script runs (its siblings import each other). Benchmarks (benchmarks/) are never run by tests."""
    import importlib.util
    import sys

    tools = str(ROOT / "tools")
    if tools not in sys.path:
        sys.path.append(tools)

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


class SavedBytes:
    """CPU stand-in for `CudaPeak`: bytes of the tensors autograd saves for backward during the step (checkpointed
    modules save none). It runs out of memory above `limit`, as a CUDA device would."""

    def __init__(self, limit: float = math.inf):
        self.limit, self.calls = limit, []

    def __call__(self, step) -> float:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            if total > self.limit:
                raise torch.cuda.OutOfMemoryError("simulated: out of memory")
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step()
        self.calls.append(total)
        return float(total)

    def allocated(self) -> float:
        return 1000.0

    def release(self) -> None:
        pass
