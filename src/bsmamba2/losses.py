"""The paper's training loss: 10 * L1 in time + multi-resolution complex STFT L1.

    loss = w * mean|ŝ - s| + Σ_{win ∈ {4096, 2048, 1024, 512, 256}} mean|STFT_win(ŝ) - STFT_win(s)|

Each STFT uses a periodic Hann window of `win` samples, hop 147, n_fft = max(win, 2048) (a shorter window is
zero-padded to n_fft, centred), center=True with reflect padding, no normalisation; the spectral term is the mean
modulus of the complex difference. Everything is computed in float32, also under autocast.

The STFT is linear (reflect padding, windowing and the DFT all are), so STFT(ŝ) - STFT(s) = STFT(ŝ - s): one
transform of the difference per resolution instead of two, half the FFT work and spectrum memory of a training step.
`tests/test_losses.py` checks it against a direct DFT of ŝ and s separately, value and gradient.
"""

from __future__ import annotations

import torch
from torch import nn


class MultiResolutionSTFTLoss(nn.Module):
    """Σ over windows of mean |STFT(pred) - STFT(target)| (complex modulus)."""

    def __init__(self, windows: tuple[int, ...] = (4096, 2048, 1024, 512, 256), hop: int = 147, min_nfft: int = 2048):
        super().__init__()
        self.windows = tuple(int(w) for w in windows)
        self.hop = int(hop)
        self.n_ffts = tuple(max(w, int(min_nfft)) for w in self.windows)
        for i, w in enumerate(self.windows):
            self.register_buffer(f"window_{i}", torch.hann_window(w, periodic=True), persistent=False)

    def spectrum(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """(signals, time) -> (signals, freq, frames): the STFT of resolution `i`, in x's dtype."""
        return torch.stft(x, n_fft=self.n_ffts[i], hop_length=self.hop, win_length=self.windows[i],
                          window=getattr(self, f"window_{i}").to(x.dtype), center=True, pad_mode="reflect",
                          return_complex=True)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pred, target: (..., time) waveforms of the same shape.
        Returns:
            scalar float32.
        """
        diff = (pred.float() - target.float()).reshape(-1, pred.shape[-1])  # (signals, time)
        total = diff.new_zeros(())
        for i in range(len(self.windows)):
            total = total + self.spectrum(diff, i).abs().mean()  # STFT(pred) - STFT(target)
        return total

    def plain(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The plain twin of `forward`: both signals transformed, then subtracted (in their own dtype; for tests and
        `tools/loss_ab.py`)."""
        p, t = pred.reshape(-1, pred.shape[-1]), target.reshape(-1, target.shape[-1])
        total = p.new_zeros(())
        for i in range(len(self.windows)):
            total = total + (self.spectrum(p, i) - self.spectrum(t, i)).abs().mean()
        return total


class SeparationLoss(nn.Module):
    """time_weight * L1(time) + multi-resolution complex STFT L1; returns (total, {"time": ..., "stft": ...})."""

    def __init__(
        self,
        time_weight: float = 10.0,
        windows: tuple[int, ...] = (4096, 2048, 1024, 512, 256),
        hop: int = 147,
        min_nfft: int = 2048,
    ):
        super().__init__()
        self.time_weight = float(time_weight)
        self.stft = MultiResolutionSTFTLoss(windows, hop, min_nfft)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Args:
            pred, target: (batch, stems, channels, time).
        Returns:
            total loss (scalar float32) and its parts, detached.
        """
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        with torch.autocast(pred.device.type, enabled=False):
            time = (pred.float() - target.float()).abs().mean()
            spec = self.stft(pred, target)
        total = self.time_weight * time + spec
        return total, {"time": time.detach(), "stft": spec.detach()}
