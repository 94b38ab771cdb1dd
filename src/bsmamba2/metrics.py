"""Separation metrics of the paper: uSDR, cSDR (equal to museval's BSSEval v4), and the segment analyses.

uSDR (Music Demixing Challenge SDR) is one energy ratio over a whole track and all its channels::

    uSDR = 10·log10((Σ s² + 1e-7) / (Σ (s − ŝ)² + 1e-7))

cSDR is what `museval.metrics.bss_eval(ref, est, window=sr, hop=sr)` returns for one source in its default (v4)
mode, followed by a nan-median over frames, which is how the paper (and its official code) reports it. With a single
source and time-invariant distortion filters (v4's default, `framewise_filters=False`), BSSEval's decomposition
``ŝ = s_true + e_spat + e_interf + e_artif`` has ``s_true = s`` (the raw reference of the frame) and the three error
terms sum to ``ŝ − s`` whatever the filters are; the per-frame SDR ``‖s_true‖² / ‖e_spat + e_interf + e_artif‖²``
is therefore the plain energy ratio ``Σ_frame s² / Σ_frame (ŝ − s)²``. Only museval's framing and silence rules
must be copied:

- frames are ``window`` samples long, ``hop`` apart, ``floor((T − window + hop) / hop)`` of them; a trailing partial
  window is dropped; a signal no longer than one window is a single frame over all of it;
- a frame is NaN when, in the reference or in the estimate, the *signed sum over channels* is exactly zero at every
  sample of the frame (museval's ``_any_source_silent``; note that a stereo frame with ``left == -right`` counts as
  silent there too);
- a frame whose error is exactly zero is ``+inf`` here; museval gets a huge finite number from rounding noise
  (its error terms do not cancel bit-exactly), so only that degenerate case differs;
- cSDR is ``nanmedian`` of the frames; a track where every frame is NaN has cSDR NaN (museval refuses such input).

The result equals museval to ~1e-9 dB (see tests/test_metrics.py) and is several hundred times faster, since
museval solves a 1024×1024 least-squares system for filters whose effect cancels out.

Dataset aggregation follows the paper: cSDR = median over tracks of the per-track cSDR; uSDR = mean over tracks.

Vocal activity (for the paper's Table III and for silent-region leakage) is an RMS detector on the reference vocal;
`ActivityConfig` documents its thresholds.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

USDR_EPS = 1e-7
# Table III of the paper: vocal-segment durations in seconds, [low, high).
DURATION_BUCKETS: tuple[tuple[float, float], ...] = ((1.0, 2.0), (2.0, 4.0), (4.0, 8.0), (8.0, math.inf))


def _as_numpy(x: Any) -> np.ndarray:
    """A tensor or array-like as a NumPy array, keeping its dtype (torch tensors are detached and moved to CPU)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu()
        if str(x.dtype).startswith("torch.bfloat16") or str(x.dtype).startswith("torch.float16"):
            x = x.float()
        x = x.numpy()
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    return x


def _check_pair(estimate: np.ndarray, reference: np.ndarray, what: str) -> None:
    if estimate.shape != reference.shape:
        raise ValueError(
            f"{what}: estimate shape {tuple(estimate.shape)} != reference shape {tuple(reference.shape)}; "
            "trim or pad the estimate to the reference first"
        )
    if estimate.ndim < 2:
        raise ValueError(f"{what}: expected (..., channels, time) arrays, got shape {tuple(estimate.shape)}")


def usdr(estimate: Any, reference: Any, eps: float = USDR_EPS) -> float | np.ndarray:
    """Utterance-level SDR (Music Demixing Challenge) over the whole signal and all channels, in dB.

    Args:
        estimate: (..., channels, time) array or tensor.
        reference: same shape.
        eps: added to numerator and denominator energies (1e-7 as in the MDX evaluator).
    Returns:
        a float for (channels, time) input, else an array of shape (...).
    """
    est = _as_numpy(estimate)
    ref = _as_numpy(reference)
    _check_pair(est, ref, "usdr")
    num = np.zeros(est.shape[:-2])
    den = np.zeros(est.shape[:-2])
    step = 1 << 18  # float64 temporaries of a block stay in cache; long tracks never make full-size copies
    for t in range(0, est.shape[-1], step):
        r = np.ascontiguousarray(ref[..., t : t + step], dtype=np.float64)
        num += np.sum(np.square(r), axis=(-2, -1))
        den += np.sum(np.square(np.ascontiguousarray(est[..., t : t + step], dtype=np.float64) - r), axis=(-2, -1))
    out = 10.0 * np.log10((num + eps) / (den + eps))
    return float(out) if out.ndim == 0 else out


def load_museval_metrics():
    """The module `museval.metrics`, the reference these metrics are checked against, loaded without
    `museval/__init__` (which imports musdb → stempeg and needs ffmpeg). Raises ImportError if museval is missing."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.find_spec("museval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("museval is not installed: pip install 'bsmamba2[test]'")
    path = spec.submodule_search_locations[0] + "/metrics.py"
    mspec = importlib.util.spec_from_file_location("_museval_metrics", path)
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)
    return module


def museval_frames(length: int, window: int, hop: int) -> list[tuple[int, int]]:
    """museval's framing: (start, stop) sample indices of each window; a trailing partial window is dropped.

    Args:
        length: number of samples.
        window, hop: window and hop in samples.
    """
    if window <= 0 or hop <= 0:
        raise ValueError(f"window and hop must be positive sample counts, got window={window}, hop={hop}")
    if window < length:
        nwin = (length - window + hop) // hop
        return [(t * hop, t * hop + window) for t in range(nwin)]
    return [(0, length)]


def _channel_sum(x: np.ndarray) -> np.ndarray:
    """(..., channels, time) -> (..., time): channels added in order in the input dtype, as numpy's sum over a
    short axis does (museval's silence test); a loop, because numpy reduces a length-2 inner axis slowly."""
    acc = x[..., 0, :].copy()
    for c in range(1, x.shape[-2]):
        acc += x[..., c, :]
    return acc


def csdr_frames(
    estimate: Any, reference: Any, sample_rate: int, window: float = 1.0, hop: float = 1.0
) -> np.ndarray:
    """Per-frame BSSEval v4 SDR exactly as `museval.metrics.bss_eval(ref, est, window, hop)` gives it for one source.

    Args:
        estimate: (..., channels, time) array or tensor.
        reference: same shape.
        sample_rate: Hz; ``window`` and ``hop`` are in seconds and rounded to whole samples.
    Returns:
        (..., frames) float64 array of dB values; NaN for frames silent in the reference or the estimate.
    """
    est_in = _as_numpy(estimate)
    ref_in = _as_numpy(reference)
    _check_pair(est_in, ref_in, "csdr")
    win, hp = int(round(window * sample_rate)), int(round(hop * sample_rate))
    frames = museval_frames(est_in.shape[-1], win, hp)
    lead = est_in.shape[:-2]

    n = len(frames)
    num = np.empty(lead + (n,))
    den = np.empty(lead + (n,))
    silent = np.empty(lead + (n,), dtype=bool)
    # Frames in blocks of ~16 s so that the float64 temporaries stay small and in cache (long tracks, batches).
    per_block = max(1, (16 * sample_rate) // max(win, 1))
    for b0 in range(0, n, per_block):
        block = frames[b0 : b0 + per_block]
        lo, hi = block[0][0], block[-1][1]
        e_in, r_in = est_in[..., lo:hi], ref_in[..., lo:hi]
        r = np.ascontiguousarray(r_in, dtype=np.float64)  # contiguous: fast reductions for transposed inputs
        d = np.ascontiguousarray(e_in, dtype=np.float64) - r
        # Silence rule of museval: the channel sum (in the input dtype, as museval sums it) is zero at every sample.
        r_silent = _channel_sum(r_in) == 0  # (..., time)
        e_silent = _channel_sum(e_in) == 0
        for k, (start, stop) in enumerate(block):
            i, sl = b0 + k, slice(start - lo, stop - lo)
            num[..., i] = np.sum(np.square(r[..., sl]), axis=(-2, -1))
            den[..., i] = np.sum(np.square(d[..., sl]), axis=(-2, -1))
            silent[..., i] = np.all(r_silent[..., sl], axis=-1) | np.all(e_silent[..., sl], axis=-1)

    with np.errstate(divide="ignore", invalid="ignore"):
        sdr = 10.0 * np.log10(num / den)
    sdr = np.where(den == 0, np.inf, sdr)
    sdr = np.where(silent, np.nan, sdr)
    return sdr


def csdr(estimate: Any, reference: Any, sample_rate: int, window: float = 1.0, hop: float = 1.0) -> float | np.ndarray:
    """Chunk-level SDR: nan-median over museval's 1-s frames (the paper's cSDR), in dB.

    Args:
        estimate: (..., channels, time) array or tensor.
        reference: same shape.
        sample_rate: Hz.
        window, hop: frame length and hop in seconds (1 s each in the paper).
    Returns:
        a float for (channels, time) input, else an array of shape (...); NaN when every frame is silent.
    """
    frames = csdr_frames(estimate, reference, sample_rate, window, hop)
    all_nan = np.all(np.isnan(frames), axis=-1)
    if np.any(all_nan):
        log.warning("csdr: every frame is silent in the reference or the estimate; cSDR is NaN")
    out = np.full(frames.shape[:-1], np.nan)
    if np.any(~all_nan):
        out[~all_nan] = np.nanmedian(frames[~all_nan], axis=-1)
    return float(out) if out.ndim == 0 else out


def aggregate(per_track: Iterable[dict[str, float]]) -> dict[str, float]:
    """Dataset figures as in the paper: cSDR = median over tracks, uSDR = mean over tracks.

    Args:
        per_track: dicts with at least "usdr" and "csdr" (and optionally "leakage_db"); NaNs are skipped.
    Returns:
        {"csdr": ..., "usdr": ..., "leakage_db": ... (mean, when present), "tracks": n}
    """
    rows = list(per_track)
    out: dict[str, float] = {"tracks": len(rows)}

    def finite(key: str) -> np.ndarray:
        vals = np.array([r[key] for r in rows if key in r and r[key] is not None], dtype=np.float64)
        return vals[~np.isnan(vals)]

    c, u = finite("csdr"), finite("usdr")
    out["csdr"] = float(np.median(c)) if c.size else math.nan
    out["usdr"] = float(np.mean(u)) if u.size else math.nan
    if any("leakage_db" in r for r in rows):
        lk = finite("leakage_db")
        lk = lk[np.isfinite(lk)]
        out["leakage_db"] = float(np.mean(lk)) if lk.size else math.nan
    return out


# ---------------------------------------------------------------------------------------------------------------
# Vocal activity, regions by duration (Table III), silent-region leakage


@dataclass(frozen=True)
class ActivityConfig:
    """Thresholds of the RMS vocal-activity detector.

    The reference vocal is cut into non-overlapping frames of ``frame_seconds`` (a trailing partial frame is kept).
    A frame's level is ``20·log10(rms)`` in dBFS, the RMS taken over all its samples and channels. A frame is
    *active* when its level is at most ``-relative_db`` dB below the track's loudest frame (default: within 30 dB)
    and at least ``absolute_db`` dBFS (default: -60 dBFS). For regions (Table III), inactive gaps shorter than
    ``min_gap_seconds`` between two active frames are filled (breaths, consonant gaps), and the contiguous active
    runs that result are the vocal regions. Leakage uses the unfilled inactive frames.
    """

    frame_seconds: float = 0.05
    relative_db: float = -30.0
    absolute_db: float = -60.0
    min_gap_seconds: float = 0.3

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def frame_levels_db(signal: Any, sample_rate: int, frame_seconds: float = 0.05) -> np.ndarray:
    """RMS level in dBFS of non-overlapping frames (trailing partial frame kept).

    Args:
        signal: (channels, time).
    Returns:
        (frames,) float64; -inf for digital silence.
    """
    x = _as_numpy(signal).astype(np.float64, copy=False)
    if x.ndim != 2:
        raise ValueError(f"expected a (channels, time) signal, got shape {tuple(x.shape)}")
    flen = max(1, int(round(frame_seconds * sample_rate)))
    n_frames = -(-x.shape[-1] // flen)
    pad = n_frames * flen - x.shape[-1]
    energy = np.pad(x**2, ((0, 0), (0, pad))).reshape(x.shape[0], n_frames, flen).sum(axis=(0, 2))  # (frames,)
    counts = np.full(n_frames, flen * x.shape[0], dtype=np.float64)
    if pad:
        counts[-1] = (flen - pad) * x.shape[0]
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(energy / counts)


def vocal_activity(reference: Any, sample_rate: int, config: ActivityConfig = ActivityConfig()) -> np.ndarray:
    """Per-frame activity of a reference vocal by the RMS detector of `ActivityConfig` (no gap filling).

    Args:
        reference: (channels, time) reference vocal.
    Returns:
        (frames,) bool, frames of ``config.frame_seconds``.
    """
    levels = frame_levels_db(reference, sample_rate, config.frame_seconds)
    peak = np.max(levels) if levels.size else -np.inf
    if not np.isfinite(peak):
        return np.zeros(levels.shape, dtype=bool)
    return levels >= max(peak + config.relative_db, config.absolute_db)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index pairs of the True runs of a 1-D bool array."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def vocal_regions(
    reference: Any, sample_rate: int, config: ActivityConfig = ActivityConfig()
) -> list[tuple[int, int]]:
    """Contiguous vocal-active regions of a reference vocal, as (start, stop) sample indices.

    Args:
        reference: (channels, time) reference vocal.
    Returns:
        regions in time order; inactive gaps shorter than ``config.min_gap_seconds`` inside them are filled.
    """
    length = _as_numpy(reference).shape[-1]
    active = vocal_activity(reference, sample_rate, config).copy()
    flen = max(1, int(round(config.frame_seconds * sample_rate)))
    max_gap_frames = config.min_gap_seconds * sample_rate / flen
    runs = _runs(active)
    for (_, stop), (start, _) in zip(runs[:-1], runs[1:]):
        if start - stop < max_gap_frames:
            active[stop:start] = True
    return [(a * flen, min(b * flen, length)) for a, b in _runs(active)]


def bucket_name(low: float, high: float) -> str:
    return f">={low:g} s" if math.isinf(high) else f"{low:g}-{high:g} s"


def duration_bucket(seconds: float, buckets: Sequence[tuple[float, float]] = DURATION_BUCKETS) -> str | None:
    """Name of the Table III bucket holding a region of this duration, or None when shorter than the first."""
    for low, high in buckets:
        if low <= seconds < high:
            return bucket_name(low, high)
    return None


def region_usdr(
    estimate: Any,
    reference: Any,
    sample_rate: int,
    config: ActivityConfig = ActivityConfig(),
    buckets: Sequence[tuple[float, float]] = DURATION_BUCKETS,
) -> list[dict[str, Any]]:
    """uSDR of the estimate on each vocal-active region of the reference (the paper's Table III, per region).

    Args:
        estimate, reference: (channels, time) vocal estimate and reference.
    Returns:
        one dict per region: start/stop (samples), seconds, bucket (None below 1 s), usdr (dB).
    """
    est = _as_numpy(estimate)
    ref = _as_numpy(reference)
    _check_pair(est, ref, "region_usdr")
    rows = []
    for start, stop in vocal_regions(ref, sample_rate, config):
        seconds = (stop - start) / sample_rate
        rows.append(
            dict(
                start=start,
                stop=stop,
                seconds=seconds,
                bucket=duration_bucket(seconds, buckets),
                usdr=usdr(est[:, start:stop], ref[:, start:stop]),
            )
        )
    return rows


def bucket_summary(
    regions: Iterable[dict[str, Any]], buckets: Sequence[tuple[float, float]] = DURATION_BUCKETS
) -> list[dict[str, Any]]:
    """Table III rows: per duration bucket, mean uSDR over its regions (from all tracks), region count, seconds."""
    regions = list(regions)
    out = []
    for low, high in buckets:
        name = bucket_name(low, high)
        vals = np.array([r["usdr"] for r in regions if r["bucket"] == name], dtype=np.float64)
        secs = float(sum(r["seconds"] for r in regions if r["bucket"] == name))
        out.append(
            dict(bucket=name, regions=int(vals.size), seconds=secs, usdr=float(np.mean(vals)) if vals.size else math.nan)
        )
    return out


def silent_leakage(
    estimate: Any,
    reference: Any,
    mixture: Any,
    sample_rate: int,
    config: ActivityConfig = ActivityConfig(),
    eps: float = 1e-10,
) -> float:
    """Energy of the vocal estimate where the reference vocal is inactive, in dB relative to the mixture there.

    ``10·log10((Σ_inactive ŝ² + eps) / (Σ_inactive x² + eps))`` over the samples of the inactive frames of
    `vocal_activity` (no gap filling). Lower is better; an estimate that is exactly silent there gives about
    ``10·log10(eps / mixture energy)``. NaN when the vocal is active everywhere.

    Args:
        estimate, reference, mixture: (channels, time), same shape.
    """
    est = _as_numpy(estimate).astype(np.float64, copy=False)
    ref = _as_numpy(reference)
    mix = _as_numpy(mixture).astype(np.float64, copy=False)
    _check_pair(est, ref, "silent_leakage")
    _check_pair(mix, ref, "silent_leakage (mixture)")
    flen = max(1, int(round(config.frame_seconds * sample_rate)))
    inactive = np.repeat(~vocal_activity(ref, sample_rate, config), flen)[: ref.shape[-1]]  # (time,)
    if not np.any(inactive):
        return math.nan
    return _energy_ratio_db(est[:, inactive], mix[:, inactive], eps)


def _energy_ratio_db(est: np.ndarray, mix: np.ndarray, eps: float) -> float:
    return 10.0 * math.log10((float(np.sum(est**2)) + eps) / (float(np.sum(mix**2)) + eps))


def silent_gap_leakage(
    estimate: Any,
    reference: Any,
    mixture: Any,
    sample_rate: int,
    min_seconds: float = 0.5,
    config: ActivityConfig = ActivityConfig(),
    eps: float = 1e-10,
) -> list[dict[str, float]]:
    """`silent_leakage` per silent gap: each run of inactive frames of at least `min_seconds`, in time order.

    Args:
        estimate, reference, mixture: (channels, time), same shape.
    Returns:
        [{"start": s, "end": s, "leakage_db": dB}, ...] (seconds).
    """
    est = _as_numpy(estimate).astype(np.float64, copy=False)
    ref = _as_numpy(reference)
    mix = _as_numpy(mixture).astype(np.float64, copy=False)
    _check_pair(est, ref, "silent_gap_leakage")
    _check_pair(mix, ref, "silent_gap_leakage (mixture)")
    flen = max(1, int(round(config.frame_seconds * sample_rate)))
    inactive = ~vocal_activity(ref, sample_rate, config)  # (frames,)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], inactive.astype(np.int8), [0]])))  # run starts, ends
    gaps = []
    for a, b in zip(edges[::2], edges[1::2]):
        lo, hi = a * flen, min(b * flen, ref.shape[-1])
        if (hi - lo) / sample_rate >= min_seconds:
            leak = _energy_ratio_db(est[:, lo:hi], mix[:, lo:hi], eps)
            gaps.append({"start": lo / sample_rate, "end": hi / sample_rate, "leakage_db": leak})
    return gaps
