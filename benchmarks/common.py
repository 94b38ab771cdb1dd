"""What every benchmark here shares: the paper-size models, CUDA timing, the relative error, the stamp that makes a
number a RESULTS.md row (device, commit, date, command), JSON output and a plain text table.

The scripts in this folder run as `PYTHONPATH=src python benchmarks/NAME.py`; Python puts this folder first on the
import path, so they import this module as `common`. Nothing here imports a benchmark script.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SR = 44100


# -- models ----------------------------------------------------------------------------------------------------------
def build(arch: str, tiny: bool = False, seed: int = 0, device=None):
    """A BSMamba2 (`arch` "bsmamba2" or "mamba") or BS-RoFormer ("bsroformer" or "roformer") with random weights
    (speed does not depend on them): the paper's size, or the test size with `tiny`."""
    import torch

    from bsmamba2.config import BSMamba2Config, RoFormerConfig
    from bsmamba2.build import build_model

    if arch not in ("bsmamba2", "mamba", "bsroformer", "roformer"):
        raise ValueError(f"unknown architecture {arch!r}: use bsmamba2 or bsroformer")
    cls = BSMamba2Config if arch in ("bsmamba2", "mamba") else RoFormerConfig
    torch.manual_seed(seed)
    model = build_model(cls.tiny() if tiny else cls())
    return model if device is None else model.to(device)


def shared_dir() -> Path:
    """The project's shared test material (official fixture, the MUSDB18-HQ sample track): $BSMAMBA2_SHARED, else
    ../shared beside the checkout."""
    return Path(os.environ.get("BSMAMBA2_SHARED", ROOT.parent / "shared"))


def sample_track() -> Path:
    """The one real MUSDB18-HQ track the metric and loader benchmarks read; a clear error when it is absent."""
    track = shared_dir() / "data" / "musdb18hq-sample" / "train" / "Music Delta - 80s Rock"
    if not (track / "mixture.wav").is_file():
        raise SystemExit(f"no sample track at {track}: set BSMAMBA2_SHARED to the folder holding "
                         "data/musdb18hq-sample/, or pass a MUSDB18-HQ track folder explicitly")
    return track


# -- timing and error ------------------------------------------------------------------------------------------------
def time_cuda(fn, iters: int, warmup: int) -> list[float]:
    """Seconds per call of `fn`, each timed with CUDA events, after `warmup` untimed calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def time_inference(model, batch: int, samples: int, iters: int, warmup: int) -> dict:
    """bf16-autocast inference of `model.forward_waveform` on random stereo input of `samples` at `batch` (CUDA):
    median seconds per batch, audio-seconds per second and peak GPU memory."""
    import statistics

    import torch

    model.eval()
    wave = torch.randn(batch, 2, samples, device="cuda") * 0.1

    def step():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model.forward_waveform(wave)

    torch.cuda.reset_peak_memory_stats()
    times = time_cuda(step, iters, warmup)
    med = statistics.median(times)
    return {"infer_s_per_batch": med, "infer_s_all": times, "audio_s_per_s": batch * samples / SR / med,
            "infer_peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def rel_error(a, b) -> float:
    """‖a − b‖ / ‖b‖ in float64; complex tensors are compared whole (real and imaginary parts)."""
    import torch

    a, b = (torch.view_as_real(t) if t.is_complex() else t for t in (a, b))
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# -- where a number comes from ---------------------------------------------------------------------------------------
def commit() -> str | None:
    """The checkout's short commit, with "+dirty" when tracked files differ from it; None outside a git checkout."""
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if rev.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return rev.stdout.strip() + ("+dirty" if dirty else "")


def device_label(device=None) -> str:
    """"NVIDIA H200" for a CUDA device, "x86_64 CPU, 2 threads" for the CPU."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def stamp(device=None) -> dict:
    """What a RESULTS.md row needs besides the value: date, commit, device, versions and the command as run."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"date": datetime.date.today().isoformat(), "commit": commit(), "device": device_label(device),
            "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}


def print_stamp(device=None) -> dict:
    """Print the stamp as one `# {...}` line (for the log) and return it (for the JSON)."""
    s = stamp(device)
    print("# " + json.dumps(s), flush=True)
    return s


def out_path(explicit: str | None, name: str) -> Path | None:
    """Where a benchmark writes its JSON: the --out it was given, else $OUT/name when $OUT is set, else nowhere."""
    if explicit:
        return Path(explicit)
    return Path(os.environ["OUT"]) / name if os.environ.get("OUT") else None


def write_json(path: Path | str | None, data) -> None:
    """Write `data` as JSON through a temporary name and a rename (no partial file); nothing when `path` is None."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def format_table(columns: list[tuple[str, str]], rows: list[dict]) -> str:
    """A plain text table: `columns` are (key, header) pairs; floats print with 3 significant decimals, missing
    values as "-"; each column as wide as its widest cell, numbers right-aligned."""

    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    cells = [[cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h) in enumerate(columns)]
    numeric = [all(isinstance(r.get(k), (int, float)) or r.get(k) is None for r in rows) for k, _ in columns]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line([h for _, h in columns])] + [line(c) for c in cells])


# -- models and test audio shared by the separation benchmarks ---------------------------------------------------
def make_model(name: str):
    import torch

    if name == "passthrough":  # no model work: measures the streaming pipeline alone (read, chunk, blend, write)

        class Passthrough(torch.nn.Module):
            stems, audio_channels, sample_rate = ("vocals",), 2, 44100

            def forward_waveform(self, x):  # (b, c, t) -> (b, 1, c, t)
                return 0.5 * x[:, None]

        return Passthrough()
    if name in ("paper", "tiny"):
        return build("bsmamba2", tiny=name == "tiny").eval()
    from bsmamba2.checkpoint import load_model

    path = shared_dir() / "fixtures" / "official" / "official_tiny_a.ckpt" if name == "official-tiny" else Path(name)
    return load_model(path)


def music_like(seconds: float, sr: int = 44100, seed: int = 0):
    """Stereo test signal with some structure: tones, a beat and noise. (2, time) float32."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    tone = 0.2 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 660 * t + 1.0)
    beat = 0.3 * np.exp(-((t * 2) % 1.0) * 20) * rng.standard_normal(n)
    left = tone + beat + 0.02 * rng.standard_normal(n)
    right = 0.8 * tone + beat + 0.02 * rng.standard_normal(n)
    return np.stack([left, right]).astype(np.float32)


def write_long_file(path: Path, minutes: float, sr: int = 44100) -> None:
    """Write an N-minute stereo PCM16 file block by block (the generator itself never holds the whole file)."""
    import soundfile as sf

    block = music_like(60.0, sr)  # one minute, repeated with a varying gain
    with sf.SoundFile(str(path), "w", samplerate=sr, channels=2, subtype="PCM_16") as f:
        whole, rest = divmod(minutes, 1.0)
        for i in range(int(whole)):
            f.write((block * (0.6 + 0.4 * math.sin(i))).T)
        if rest:
            f.write(block[:, : int(rest * 60 * sr)].T)
