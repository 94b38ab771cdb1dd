"""Leakage per silent gap, and its annotation on a spectrogram panel."""

import math

import numpy as np
import pytest

from bsmamba2 import metrics
from bsmamba2.metrics import silent_gap_leakage
from bsmamba2.plots import annotate_gaps, plot_spectrograms

SR = 8000


def _signals():
    rng = np.random.default_rng(0)
    t = np.arange(4 * SR) / SR
    vocal = np.zeros((2, t.size), dtype=np.float32)
    sung = ((t >= 1.0) & (t < 2.0)) | (t >= 3.5)
    vocal[:, sung] = 0.3 * np.sin(2 * np.pi * 220 * t[sung])
    accomp = (0.1 * rng.standard_normal((2, t.size))).astype(np.float32)
    mix = vocal + accomp
    est = vocal.copy()
    est[:, t < 1.0] += 0.01 * accomp[:, t < 1.0]  # -40 dB in the first gap
    est[:, (t >= 2.0) & (t < 3.5)] += 0.1 * accomp[:, (t >= 2.0) & (t < 3.5)]  # -20 dB in the second
    return est, vocal, mix


def test_gap_leakage_matches_the_metric_per_gap():
    est, ref, mix = _signals()
    gaps = silent_gap_leakage(est, ref, mix, SR)
    assert [(g["start"], g["end"]) for g in gaps] == [(0.0, 1.0), (2.0, 3.5)]
    assert gaps[0]["leakage_db"] == pytest.approx(-40.0, abs=0.01)
    assert gaps[1]["leakage_db"] == pytest.approx(-20.0, abs=0.01)
    # the whole-song number pools the same samples
    e_est = sum(10 ** (g["leakage_db"] / 10) * np.sum(mix[:, int(g["start"] * SR):int(g["end"] * SR)] ** 2)
                for g in gaps)
    e_mix = sum(np.sum(mix[:, int(g["start"] * SR):int(g["end"] * SR)] ** 2) for g in gaps)
    assert metrics.silent_leakage(est, ref, mix, SR) == pytest.approx(10 * math.log10(e_est / e_mix), abs=0.01)
    assert silent_gap_leakage(est, ref, mix, SR, min_seconds=1.2) == gaps[1:]
    with pytest.raises(ValueError, match="trim or pad the estimate"):
        silent_gap_leakage(est[:, :100], ref, mix, SR)


def test_annotate_gaps_writes_the_numbers_on_the_panel():
    est, ref, mix = _signals()
    fig = plot_spectrograms({"mixture": mix, "estimate": est}, SR, n_fft=512, hop_length=256, n_mels=32)
    annotate_gaps(fig.axes[1], silent_gap_leakage(est, ref, mix, SR))
    labels = [t.get_text() for t in fig.axes[1].texts if t.get_text()]  # the brackets are empty annotations
    assert labels == ["-40 dB", "-20 dB"]
    assert not fig.axes[0].texts
