"""Figures (matplotlib, PNG): stacked mel spectrograms as in the paper's Fig. 2, per-track score bars, and the
input-length sweep.

Figures are built with `matplotlib.figure.Figure` directly (no pyplot state, no GUI backend), so they work in
threads, servers and headless machines. Every plotting function returns the Figure and, given a path, also writes it
atomically (temporary file, then rename).
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

MEL_TICKS_HZ = (0, 250, 500, 1000, 2000, 4000, 8000, 16000)


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write a figure to `path` (format from its ending, PNG usually) through a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}{path.suffix or '.png'}")
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=(path.suffix.lstrip(".") or "png"))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: 2595·log10(1 + f/700)."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """Triangular filters on the HTK mel scale, each normalised to unit area (Slaney-style).

    Returns:
        (n_mels, n_fft // 2 + 1) float64.
    """
    fmax = sample_rate / 2 if fmax is None else fmax
    if not 0 <= fmin < fmax <= sample_rate / 2:
        raise ValueError(f"need 0 <= fmin < fmax <= {sample_rate / 2:g} Hz, got fmin={fmin}, fmax={fmax}")
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))  # (n_mels + 2,)
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lower) / (center - lower)
    down = (upper - freqs[None]) / (upper - center)
    fb = np.maximum(0.0, np.minimum(up, down))  # (n_mels, freq)
    return fb * (2.0 / (upper - lower))


def mel_spectrogram(
    wave: Any,
    sample_rate: int,
    n_fft: int = 2048,
    hop_length: int = 512,
    n_mels: int = 128,
    fmin: float = 0.0,
    fmax: float | None = None,
    amin: float = 1e-10,
) -> np.ndarray:
    """Mel power spectrogram in dB (10·log10 of power, floor `amin`), channels averaged in power.

    Args:
        wave: (channels, time) or (time,) array or tensor.
    Returns:
        (n_mels, frames) float64 dB; frames = 1 + time // hop_length (centered STFT, periodic Hann).
    """
    x = torch.as_tensor(np.asarray(wave.detach().cpu() if hasattr(wave, "detach") else wave), dtype=torch.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"expected a (channels, time) or (time,) waveform, got shape {tuple(x.shape)}")
    if x.shape[-1] < 2:
        raise ValueError("the waveform is too short for a spectrogram")
    pad_mode = "reflect" if x.shape[-1] > n_fft // 2 else "constant"
    spec = torch.stft(
        x, n_fft, hop_length, window=torch.hann_window(n_fft), center=True, pad_mode=pad_mode, return_complex=True
    )  # (channels, freq, frames)
    power = spec.abs().pow(2).mean(dim=0).double().numpy()  # (freq, frames)
    mel = mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax) @ power  # (n_mels, frames)
    return 10.0 * np.log10(np.maximum(mel, amin))


def plot_spectrograms(
    signals: Mapping[str, Any],
    sample_rate: int,
    path: str | os.PathLike | None = None,
    *,
    start: float = 0.0,
    duration: float | None = None,
    title: str | None = None,
    n_fft: int = 2048,
    hop_length: int = 512,
    n_mels: int = 128,
    fmax: float | None = None,
    top_db: float = 80.0,
    cmap: str = "magma",
    width: float = 10.0,
    panel_height: float = 2.2,
) -> Figure:
    """Mel spectrograms stacked top to bottom on one colour scale (the paper's Fig. 2: mixture, reference, estimates).

    Args:
        signals: panel label -> (channels, time) or (time,) waveform, all at `sample_rate`, e.g.
            {"mixture": mix, "reference vocals": ref, "BSMamba2": est}. Shown in the mapping's order.
        sample_rate: Hz.
        path: if given, the PNG is written there too.
        start, duration: time range shown, seconds (duration None: to the end of the shortest signal).
        top_db: colour range below the loudest bin over all panels.
    Returns:
        the Figure.
    """
    if not signals:
        raise ValueError("give at least one signal to plot")
    waves = {}
    for label, w in signals.items():
        arr = np.asarray(w.detach().cpu().float() if hasattr(w, "detach") else w, dtype=np.float32)
        waves[label] = arr[None] if arr.ndim == 1 else arr
    length = min(w.shape[-1] for w in waves.values())
    a = int(round(start * sample_rate))
    b = length if duration is None else min(length, a + int(round(duration * sample_rate)))
    if not 0 <= a < b:
        raise ValueError(
            f"time range {start:g} s + {duration} s is outside the signals ({length / sample_rate:.2f} s long)"
        )
    specs = {k: mel_spectrogram(w[:, a:b], sample_rate, n_fft, hop_length, n_mels, fmax=fmax) for k, w in waves.items()}
    vmax = max(float(s.max()) for s in specs.values())
    vmin = vmax - top_db
    f_top = sample_rate / 2 if fmax is None else fmax
    mel_top = float(hz_to_mel(f_top))

    fig = Figure(figsize=(width, panel_height * len(specs) + (0.4 if title else 0.0)), layout="constrained")
    axes = fig.subplots(len(specs), 1, sharex=True, squeeze=False)[:, 0]
    t0, t1 = a / sample_rate, b / sample_rate
    image = None
    for ax, (label, spec) in zip(axes, specs.items()):
        image = ax.imshow(
            spec, origin="lower", aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, extent=(t0, t1, 0, n_mels),
            interpolation="nearest",
        )  # fmt: skip
        ticks = [f for f in MEL_TICKS_HZ if f <= f_top]
        ax.set_yticks([hz_to_mel(f) / mel_top * n_mels for f in ticks])
        ax.set_yticklabels([f"{f / 1000:g}k" if f >= 1000 else f"{f:g}" for f in ticks])
        ax.set_ylabel("Hz")
        ax.set_title(label, loc="left", fontsize=10)
    axes[-1].set_xlabel("time (s)")
    fig.colorbar(image, ax=list(axes), label="dB", shrink=0.9, pad=0.01)
    if title:
        fig.suptitle(title)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_track_scores(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike | None = None,
    *,
    metric: str = "csdr",
    label: str = "cSDR (dB)",
    title: str | None = None,
) -> Figure:
    """Horizontal bars of one per-track metric, best on top, with the median over tracks as a dashed line.

    Args:
        rows: per-track dicts with "track" and `metric` (as `bsmamba2.evaluate` writes them).
    """
    data = [(str(r["track"]), float(r[metric])) for r in rows if metric in r]
    if not data:
        raise ValueError(f"no per-track values of '{metric}' to plot")
    data.sort(key=lambda tv: (-math.inf if math.isnan(tv[1]) else tv[1]))
    names = [n for n, _ in data]
    vals = np.array([v for _, v in data])
    fig = Figure(figsize=(8, 1.2 + 0.32 * len(data)), layout="constrained")
    ax = fig.subplots()
    shown = np.nan_to_num(vals, nan=0.0, posinf=0.0, neginf=0.0)
    colors = ["tab:blue" if v >= 0 else "tab:red" for v in shown]
    ax.barh(range(len(data)), shown, color=colors)
    ax.set_yticks(range(len(data)))
    ax.set_yticklabels(names, fontsize=8)
    finite = vals[np.isfinite(vals)]
    span = float(np.ptp(shown)) or 1.0
    for i, v in enumerate(vals):
        text = "nan" if math.isnan(v) else f"{v:.2f}"
        ax.text(shown[i] + (0.01 * span if shown[i] >= 0 else -0.01 * span), i, text, va="center",
                ha="left" if shown[i] >= 0 else "right", fontsize=8)  # fmt: skip
    if finite.size:
        med = float(np.median(finite))
        ax.axvline(med, color="k", linestyle="--", linewidth=1, label=f"median {med:.2f} dB")
        ax.legend(loc="lower right", fontsize=8)
    ax.axvline(0, color="0.5", linewidth=0.8)
    lo, hi = min(0.0, float(shown.min())), max(0.0, float(shown.max()))
    ax.set_xlim(lo - 0.12 * span, hi + 0.12 * span)
    ax.set_xlabel(label)
    ax.set_title(title or f"{label} per track")
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_segment_sweep(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike | None = None, *, title: str | None = None
) -> Figure:
    """cSDR and uSDR against the input length (the paper's Table IV as a figure)."""
    if not rows:
        raise ValueError("no sweep rows to plot")
    seg = np.array([float(r["segment"]) for r in rows])
    order = np.argsort(seg)
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    for key, name, marker in (("csdr", "cSDR", "o"), ("usdr", "uSDR", "s")):
        ax.plot(seg[order], np.array([float(r[key]) for r in rows])[order], marker=marker, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(seg[order])
    ax.set_xticklabels([f"{s:g}" for s in seg[order]])
    ax.set_xlabel("input length (s)")
    ax.set_ylabel("dB")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title or "separation quality vs input length")
    if path is not None:
        save_figure(fig, path)
    return fig


def annotate_gaps(ax: Any, gaps: Sequence[Mapping[str, float]], y: float = 0.93, fontsize: float = 7.5) -> None:
    """Write each gap's leakage (dB) over it on a spectrogram panel, with a bracket spanning the gap."""
    for gap in gaps:
        mid = 0.5 * (gap["start"] + gap["end"])
        ax.annotate("", xy=(gap["start"], y), xytext=(gap["end"], y), xycoords=("data", "axes fraction"),
                    arrowprops=dict(arrowstyle="|-|", color="white", lw=0.7, shrinkA=0, shrinkB=0,
                                    mutation_scale=2.5))
        ax.text(mid, y - 0.04, f"{gap['leakage_db']:.0f} dB", transform=ax.get_xaxis_transform(), ha="center",
                va="top", fontsize=fontsize, color="white",
                bbox=dict(boxstyle="round,pad=0.15", fc="black", ec="none", alpha=0.55))
