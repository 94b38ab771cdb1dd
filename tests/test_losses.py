"""The paper's loss: 10·L1 in time + multi-resolution complex STFT L1 (hop 147, n_fft = max(window, 2048)); the
silence term against the evaluation's leakage metric."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bsmamba2.losses import MultiResolutionSTFTLoss, SeparationLoss, SilentLeakageLoss, inactive_frames
from bsmamba2.metrics import silent_leakage, vocal_activity

SR = 44100


def _stft_reference(x: np.ndarray, win: int, n_fft: int, hop: int) -> np.ndarray:
    """Direct DFT of centred, reflect-padded frames with a periodic Hann window zero-padded (centred) to n_fft."""
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    left = (n_fft - win) // 2
    full = np.zeros(n_fft)
    full[left : left + win] = window
    padded = np.pad(x, n_fft // 2, mode="reflect")
    frames = 1 + (len(padded) - n_fft) // hop
    out = np.stack([np.fft.rfft(padded[i * hop : i * hop + n_fft] * full) for i in range(frames)], axis=-1)
    return out  # (freq, frames)


def test_multires_stft_loss_matches_direct_dft():
    rng = np.random.default_rng(0)
    pred = rng.standard_normal((2, 3000))
    target = rng.standard_normal((2, 3000))
    windows, hop = (4096, 2048, 1024, 512, 256), 147
    expect = 0.0
    for w in windows:
        n_fft = max(w, 2048)
        diffs = [np.abs(_stft_reference(p, w, n_fft, hop) - _stft_reference(t, w, n_fft, hop)) for p, t in zip(pred, target)]
        expect += np.mean(diffs)
    loss = MultiResolutionSTFTLoss(windows, hop, 2048)
    got = loss(torch.from_numpy(pred), torch.from_numpy(target))
    assert got.dtype == torch.float32  # computed in float32 always
    assert abs(float(got) - expect) / expect < 1e-5
    assert loss.n_ffts == (4096, 2048, 2048, 2048, 2048)


def test_stft_of_the_difference_matches_two_transforms_in_value_and_gradient():
    """The loss transforms ŝ - s once; the plain form transforms ŝ and s and subtracts (float64, fresh inputs)."""
    torch.manual_seed(3)
    pred = torch.randn(2, 1, 2, 5000, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 1, 2, 5000, dtype=torch.float64)
    loss = MultiResolutionSTFTLoss((4096, 1024, 256), 147, 2048)
    want = loss.plain(pred, target)
    (want_grad,) = torch.autograd.grad(want, pred)
    with torch.no_grad():  # the loss always computes in float32: compare at float32's precision
        pred32 = pred.detach().float().requires_grad_(True)
    got = loss(pred32, target.float())
    (got_grad,) = torch.autograd.grad(got, pred32)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-4, atol=1e-4 * float(want_grad.abs().max()))


def test_separation_loss_weights_and_zero_at_target():
    torch.manual_seed(0)
    target = torch.randn(2, 1, 2, 8000)
    pred = target + 0.01 * torch.randn_like(target)
    fn = SeparationLoss(time_weight=10.0)
    total, parts = fn(pred, target)
    assert torch.allclose(total, 10 * parts["time"] + parts["stft"])
    assert torch.allclose(parts["time"], (pred - target).abs().mean())
    assert float(fn(target, target)[0]) == 0.0
    # gradient flows to the prediction
    pred.requires_grad_(True)
    fn(pred, target)[0].backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_separation_loss_under_bf16_autocast_stays_float32():
    target = torch.randn(1, 1, 2, 4000)
    pred = target.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = SeparationLoss()(pred, target)
    assert total.dtype == torch.float32


def test_separation_loss_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        SeparationLoss()(torch.zeros(1, 1, 2, 100), torch.zeros(1, 2, 2, 100))


def _sparse_excerpts(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch 3, stems 2, channels 2, 1 s) targets with sung bursts, quiet tails and silence (float64): item 0 a
    burst with a decaying tail and a gap, item 1 a stem silent throughout, item 2 a stem active throughout (noise);
    the mixture is the sum plus an accompaniment; an estimate that leaks a little of it everywhere."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(SR, dtype=torch.float64) / SR
    burst = torch.sin(2 * torch.pi * 440 * t) * ((t > 0.2) & (t < 0.5)) * torch.exp(-torch.clamp(t - 0.45, min=0) * 60)
    target = torch.zeros(3, 2, 2, SR, dtype=torch.float64)
    target[0, 0] = 0.3 * burst
    target[0, 1] = 0.1 * torch.randn(2, SR, generator=g, dtype=torch.float64)
    target[1, 1] = 0.2 * torch.randn(2, SR, generator=g, dtype=torch.float64)
    target[2, 0] = 0.1 * torch.randn(2, SR, generator=g, dtype=torch.float64)
    target[2, 1] = 0.05 * burst.roll(9000)
    mixture = target.sum(1) + 0.2 * torch.randn(3, 2, SR, generator=g, dtype=torch.float64)
    estimate = target + 0.01 * mixture[:, None]
    return estimate, target, mixture


def test_inactive_frames_match_the_evaluation_detector():
    """The loss's silent frames are the evaluation's: `metrics.vocal_activity` negated, frame by frame, for every
    (excerpt, stem), a silent stem inactive everywhere."""
    _, target, _ = _sparse_excerpts()
    got = inactive_frames(target, 2205)  # (3, 2, 20)
    assert got.shape == (3, 2, 20)
    for b in range(3):
        for n in range(2):
            want = ~vocal_activity(target[b, n].numpy(), SR)
            np.testing.assert_array_equal(got[b, n].numpy(), want, err_msg=f"excerpt {b}, stem {n}")
    assert got[1, 0].all() and not got[2, 0].any() and 0 < got[0, 0].sum() < 20


def test_silence_term_equals_the_leakage_metric():
    """Without its floor the term is `metrics.silent_leakage` (the dB the evaluation reports), averaged over the
    (excerpt, stem) pairs that have silent frames; a pair active throughout is left out of the mean."""
    estimate, target, mixture = _sparse_excerpts()
    term = SilentLeakageLoss(SR, floor_db=-300.0)
    per_item, has = term.per_item(estimate, target, mixture)
    want = np.full((3, 2), np.nan)
    for b in range(3):
        for n in range(2):
            want[b, n] = silent_leakage(estimate[b, n].numpy(), target[b, n].numpy(), mixture[b].numpy(), SR)
    np.testing.assert_array_equal(has.numpy(), ~np.isnan(want))
    np.testing.assert_allclose(per_item[has].numpy(), want[~np.isnan(want)], rtol=0, atol=1e-6)
    assert float(term(estimate, target, mixture)) == pytest.approx(float(np.nanmean(want)), abs=1e-6)
    # the estimate leaks 0.01 of the mixture (-40 dB) plus the target's own tail in its silent frames
    assert -41.0 < float(per_item[1, 0]) < -39.0


def test_silence_term_floor_and_gradient():
    """The floor bounds the term (an exactly silent estimate gives floor_db); the gradient reaches the estimate only
    in the stems' silent frames; an excerpt with no silent frame anywhere gives 0."""
    estimate, target, mixture = _sparse_excerpts()
    term = SilentLeakageLoss(SR, floor_db=-50.0)
    silent = estimate.clone()
    inactive = inactive_frames(target, 2205).repeat_interleave(2205, -1)[:, :, None]  # (3, 2, 1, time)
    silent[inactive.expand_as(silent)] = 0.0
    leak, has = term.per_item(silent, target, mixture)
    torch.testing.assert_close(leak[has], torch.full_like(leak[has], -50.0))
    pred = estimate.clone().requires_grad_(True)
    term(pred, target, mixture).backward()
    assert pred.grad[~inactive.expand_as(pred)].abs().max() == 0
    assert pred.grad[inactive.expand_as(pred)].abs().max() > 0
    # halving a leak lowers the term by 6 dB whatever its level (well above the floor): in the silent stem of
    # excerpt 1, a leak of the mixture at -20 and at -40 dB
    deep = SilentLeakageLoss(SR, floor_db=-100.0)
    for level in (0.1, 0.01):
        leak = [float(deep.per_item(f * level * mixture[:, None].expand_as(target), target, mixture)[0][1, 0])
                for f in (1.0, 0.5)]
        assert leak[0] == pytest.approx(20 * np.log10(level), abs=1e-3)
        assert leak[0] - leak[1] == pytest.approx(20 * np.log10(2), abs=1e-3)
    active = 0.1 * torch.randn(1, 1, 2, 4410, dtype=torch.float64)
    assert float(term(active, active, active[:, 0])) == 0.0


def test_separation_loss_with_the_silence_term():
    estimate, target, mixture = _sparse_excerpts()
    plain = SeparationLoss()
    total0, parts0 = plain(estimate, target)
    assert float(parts0["silence"]) == 0.0  # off by default: the paper's loss
    fn = SeparationLoss(silence_weight=0.02, silence_floor_db=-50.0)
    total, parts = fn(estimate, target, mixture)
    want = float(SilentLeakageLoss(SR, -50.0)(estimate, target, mixture))
    assert float(parts["silence"]) == pytest.approx(want, rel=1e-5)
    assert float(total) == pytest.approx(float(total0) + 0.02 * want, rel=1e-5)
    with pytest.raises(ValueError, match="needs the mixture"):
        fn(estimate, target)
