"""The paper's loss: 10·L1 in time + multi-resolution complex STFT L1 (hop 147, n_fft = max(window, 2048))."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bsmamba2.losses import MultiResolutionSTFTLoss, SeparationLoss


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
