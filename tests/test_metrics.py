"""Metrics: uSDR/cSDR closed forms, cSDR equal to museval on real stems, activity regions, leakage, aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from bsmamba2 import metrics
from bsmamba2.metrics import (
    ActivityConfig,
    aggregate,
    bucket_summary,
    csdr,
    csdr_frames,
    duration_bucket,
    load_museval_metrics,
    museval_frames,
    region_usdr,
    silent_leakage,
    usdr,
    vocal_activity,
    vocal_regions,
)

SR = 44100


def _museval_metrics():
    try:
        return load_museval_metrics()
    except ImportError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def museval_metrics():
    return _museval_metrics()


@pytest.fixture(scope="module")
def stems(sample_track):
    """Real vocals and mixture, (time, channels) float32 as museval takes them."""
    vocals, sr = sf.read(sample_track / "vocals.wav", dtype="float32")
    mixture, _ = sf.read(sample_track / "mixture.wav", dtype="float32")
    assert sr == SR
    return vocals, mixture


def _museval_csdr_frames(mm, est_tc: np.ndarray, ref_tc: np.ndarray) -> np.ndarray:
    """What the official BSMamba2 evaluation calls: bss_eval(ref, est, window=1 s, hop=1 s), one source."""
    sdr, *_ = mm.bss_eval(ref_tc[None], est_tc[None], window=1 * SR, hop=1 * SR)
    return sdr[0]


def _distortions(vocals: np.ndarray, mixture: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(estimate, reference) pairs, (time, channels) float32, including exactly silent frames."""
    rng = np.random.default_rng(0)
    cases = {}
    # 1. leaky, scaled estimate with one exactly silent estimate frame
    est = 0.7 * vocals + 0.1 * mixture
    est[SR : 2 * SR] = 0.0
    cases["leaky_silent_estimate_frame"] = (est, vocals)
    # 2. reference with an exactly silent frame, estimate = reference + noise
    ref = vocals.copy()
    ref[3 * SR : 4 * SR] = 0.0
    est = ref + 0.01 * rng.standard_normal(ref.shape).astype(np.float32)
    cases["silent_reference_frame"] = (est, ref)
    # 3. filtered and delayed estimate (a time-invariant distortion BSSEval's filters could absorb)
    kernel = np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32)
    est = np.stack([np.convolve(vocals[:, c], kernel)[: len(vocals)] for c in range(2)], axis=1)
    est = np.roll(est, 7, axis=0)
    cases["filtered_delayed"] = (est.astype(np.float32), vocals)
    # 4. the mixture as estimate (very low SDR) and a frame where left == -right (museval counts it silent)
    est = mixture.copy()
    est[4 * SR : 5 * SR, 1] = -est[4 * SR : 5 * SR, 0]
    cases["mixture_antiphase_frame"] = (est, vocals)
    # 5. channel swap plus float64 input
    cases["channel_swap_float64"] = (vocals[:, ::-1].astype(np.float64), vocals.astype(np.float64))
    return cases


def test_csdr_equals_museval_on_real_stems(museval_metrics, stems):
    vocals, mixture = stems
    assert len(vocals) % SR != 0, "the sample should exercise the dropped trailing partial window"
    for name, (est, ref) in _distortions(vocals, mixture).items():
        expected = _museval_csdr_frames(museval_metrics, est, ref)
        ours = csdr_frames(est.T, ref.T, SR)
        assert ours.shape == expected.shape == (len(vocals) // SR,), name
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(expected), err_msg=name)
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6, equal_nan=True, err_msg=name)
        # the paper's per-track number
        assert abs(csdr(est.T, ref.T, SR) - np.nanmedian(expected)) < 1e-6, name
    # the silent frames really were exercised
    frames = csdr_frames(*(a.T for a in _distortions(vocals, mixture)["silent_reference_frame"]), SR)
    assert np.isnan(frames[3]) and np.isfinite(frames[:3]).all()


def test_csdr_equals_museval_short_signal_and_overlap(museval_metrics, stems):
    vocals, mixture = stems
    est = 0.5 * vocals + 0.05 * mixture
    # shorter than one window: museval evaluates a single frame over the whole signal
    short = slice(0, 30000)
    expected = _museval_csdr_frames(museval_metrics, est[short], vocals[short])
    np.testing.assert_allclose(csdr_frames(est[short].T, vocals[short].T, SR), expected, atol=1e-6)
    # overlapping windows (2 s window, 1.5 s hop: museval's own defaults)
    exp, *_ = museval_metrics.bss_eval(vocals[None], est[None], window=2 * SR, hop=int(1.5 * SR))
    ours = csdr_frames(est.T, vocals.T, SR, window=2.0, hop=1.5)
    np.testing.assert_allclose(ours, exp[0], atol=1e-6)


def test_museval_framing_rule():
    assert museval_frames(10, 3, 3) == [(0, 3), (3, 6), (6, 9)]  # trailing partial window dropped
    assert museval_frames(9, 3, 3) == [(0, 3), (3, 6), (6, 9)]
    assert museval_frames(3, 3, 3) == [(0, 3)]
    assert museval_frames(2, 3, 3) == [(0, 2)]  # shorter than a window: one frame over everything
    assert museval_frames(10, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    with pytest.raises(ValueError, match="positive"):
        museval_frames(10, 0, 1)


def test_usdr_closed_form():
    ref = torch.randn(2, 5000, dtype=torch.float64)
    # estimate = ref * (1 - a): error energy is a^2 of the reference energy
    for a in (0.5, 0.1, 0.01):
        got = usdr((1 - a) * ref, ref)
        e = float((ref**2).sum())
        assert got == pytest.approx(10 * math.log10((e + 1e-7) / (a * a * e + 1e-7)), abs=1e-9)
        assert got == pytest.approx(-20 * math.log10(a), abs=1e-6)
    # perfect estimate: limited by the MDX epsilon
    e = float((ref**2).sum())
    assert usdr(ref, ref) == pytest.approx(10 * math.log10((e + 1e-7) / 1e-7))
    # batched: (batch, channels, time) -> (batch,)
    batch = torch.stack([ref, 0.5 * ref])
    np.testing.assert_allclose(usdr(batch, torch.stack([ref, ref])), [usdr(ref, ref), usdr(0.5 * ref, ref)])
    with pytest.raises(ValueError, match="shape"):
        usdr(ref[:, :100], ref)


def test_csdr_closed_form_per_frame():
    rng = np.random.default_rng(1)
    n_frames = 5
    ref = rng.standard_normal((2, n_frames * SR + 1234))  # trailing partial window is ignored
    noise = rng.standard_normal(ref.shape)
    gains_db = np.array([0.0, 10.0, 20.0, 5.0, 30.0])  # per-frame SNR
    scale = np.concatenate([np.repeat(10 ** (-gains_db / 20), SR), np.full(1234, 100.0)])
    # make the per-frame noise energy exactly the reference's frame energy times 10^(-g/10)
    est = ref.copy()
    for t in range(n_frames):
        sl = slice(t * SR, (t + 1) * SR)
        n = noise[:, sl] * math.sqrt((ref[:, sl] ** 2).sum() / (noise[:, sl] ** 2).sum())
        est[:, sl] += n * scale[sl][None]
    est[:, n_frames * SR :] += 100.0 * noise[:, n_frames * SR :]
    frames = csdr_frames(est, ref, SR)
    np.testing.assert_allclose(frames, gains_db, atol=1e-9)
    assert csdr(est, ref, SR) == pytest.approx(10.0)  # median of the five
    # silent frames are skipped by the median; an exact frame is +inf
    est2 = est.copy()
    est2[:, 0:SR] = 0.0
    est2[:, SR : 2 * SR] = ref[:, SR : 2 * SR]
    f2 = csdr_frames(est2, ref, SR)
    assert np.isnan(f2[0]) and f2[1] == np.inf
    assert csdr(est2, ref, SR) == pytest.approx(np.median([np.inf, 20.0, 5.0, 30.0]))
    # every frame silent -> NaN, not an error
    assert math.isnan(csdr(np.zeros_like(ref), ref, SR))
    # batched and torch input
    batched = csdr(torch.from_numpy(np.stack([est, ref * 0.5])), torch.from_numpy(np.stack([ref, ref])), SR)
    np.testing.assert_allclose(batched, [10.0, 20 * math.log10(2)], atol=1e-9)


def test_aggregate_is_median_of_csdr_and_mean_of_usdr():
    rows = [
        dict(csdr=1.0, usdr=2.0, leakage_db=-30.0),
        dict(csdr=5.0, usdr=4.0, leakage_db=-20.0),
        dict(csdr=2.0, usdr=9.0, leakage_db=float("nan")),
        dict(csdr=float("nan"), usdr=3.0, leakage_db=-10.0),
    ]
    out = aggregate(rows)
    assert out["tracks"] == 4
    assert out["csdr"] == 2.0  # median of 1, 5, 2 (NaN skipped)
    assert out["usdr"] == pytest.approx(4.5)
    assert out["leakage_db"] == pytest.approx(-20.0)


def _bursts(durations: list[float], gap: float, level: float = 0.3) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """A stereo tone that is on for each duration, separated by `gap` seconds of digital silence."""
    pieces, spans, pos = [np.zeros((2, int(gap * SR)))], [], int(gap * SR)
    for d in durations:
        n = int(round(d * SR))
        t = np.arange(n) / SR
        pieces += [level * np.stack([np.sin(2 * np.pi * 220 * t)] * 2), np.zeros((2, int(gap * SR)))]
        spans.append((pos, pos + n))
        pos += n + int(gap * SR)
    return np.concatenate(pieces, axis=1), spans


def test_vocal_regions_and_buckets():
    durations = [0.5, 1.5, 3.0, 5.0, 9.0]
    vocal, spans = _bursts(durations, gap=1.0)
    regions = vocal_regions(vocal, SR)
    assert len(regions) == len(durations)
    frame = int(0.05 * SR)
    for (a, b), (sa, sb) in zip(regions, spans):
        assert abs(a - sa) <= frame and abs(b - sb) <= frame
    assert [duration_bucket((b - a) / SR) for a, b in regions] == [None, "1-2 s", "2-4 s", "4-8 s", ">=8 s"]
    # a short gap (a breath) inside a phrase is filled; a long one is not
    v2, _ = _bursts([1.0, 1.0], gap=0.2)
    assert len(vocal_regions(v2, SR)) == 1
    assert len(vocal_regions(v2, SR, ActivityConfig(min_gap_seconds=0.1))) == 2
    # a passage 50 dB under the peak counts as inactive (relative threshold), one 20 dB under it as active
    loud, _ = _bursts([2.0], gap=0.0, level=0.5)
    quiet, _ = _bursts([2.0], gap=0.0, level=0.5 * 10 ** (-50 / 20))
    medium, _ = _bursts([2.0], gap=0.0, level=0.5 * 10 ** (-20 / 20))
    act = vocal_activity(np.concatenate([loud, quiet, medium], axis=1), SR, ActivityConfig(min_gap_seconds=0))
    per = len(act) // 3
    assert act[:per].all() and not act[per : 2 * per].any() and act[2 * per :].all()
    # all silent: no regions
    assert vocal_regions(np.zeros((2, SR)), SR) == []


def test_region_usdr_and_bucket_summary():
    vocal, spans = _bursts([1.5, 3.0, 9.0], gap=1.0)
    est = vocal.copy()
    a, b = spans[1]
    est[:, a:b] *= 0.9  # 20 dB on the 3-s region only
    rows = region_usdr(est, vocal, SR)
    by_bucket = {r["bucket"]: r for r in rows}
    assert by_bucket["2-4 s"]["usdr"] == pytest.approx(20.0, abs=1e-3)
    assert by_bucket["1-2 s"]["usdr"] > 100 and by_bucket[">=8 s"]["usdr"] > 100
    table = bucket_summary(rows + [dict(bucket="2-4 s", usdr=10.0, seconds=3.0)])
    assert [r["bucket"] for r in table] == ["1-2 s", "2-4 s", "4-8 s", ">=8 s"]
    row = table[1]
    assert row["regions"] == 2 and row["usdr"] == pytest.approx(15.0, abs=1e-3)
    assert table[2]["regions"] == 0 and math.isnan(table[2]["usdr"])


def test_silent_leakage():
    vocal, spans = _bursts([2.0, 2.0], gap=1.0)
    rng = np.random.default_rng(2)
    accompaniment = 0.1 * rng.standard_normal(vocal.shape)
    mixture = vocal + accompaniment
    # estimate = mixture: leakage is the whole mixture there, 0 dB
    assert silent_leakage(mixture, vocal, mixture, SR) == pytest.approx(0.0, abs=1e-9)
    # estimate = vocal + accompaniment at -20 dB: -20 dB where the vocal is silent
    est = vocal + 0.1 * accompaniment
    assert silent_leakage(est, vocal, mixture, SR) == pytest.approx(-20.0, abs=1e-6)
    # the oracle leaks nothing
    assert silent_leakage(vocal, vocal, mixture, SR) < -100
    # vocal active everywhere: undefined
    assert math.isnan(silent_leakage(mixture, mixture, mixture, SR))


def test_real_track_activity(stems):
    vocals, mixture = stems
    act = vocal_activity(vocals.T, SR)
    assert 0 < act.mean() < 1, "the sample has sung and unsung passages"
    leak_mix = silent_leakage(mixture.T, vocals.T, mixture.T, SR)
    leak_oracle = silent_leakage(vocals.T, vocals.T, mixture.T, SR)
    assert leak_mix == pytest.approx(0.0) and leak_oracle < -20  # the oracle only keeps breath-level residue
    assert metrics.DURATION_BUCKETS[0] == (1.0, 2.0)
