"""The paper's training loss: 10 * L1 in time + multi-resolution complex STFT L1, and an optional silence term.

    loss = w * mean|ŝ - s| + Σ_{win ∈ {4096, 2048, 1024, 512, 256}} mean|STFT_win(ŝ) - STFT_win(s)|
           [+ w_sil * mean over excerpts of SilentLeakageLoss]

Each STFT uses a periodic Hann window of `win` samples, hop 147, n_fft = max(win, 2048) (a shorter window is
zero-padded to n_fft, centred), center=True with reflect padding, no normalisation; the spectral term is the mean
modulus of the complex difference. Everything is computed in float32, also under autocast.

The STFT is linear (reflect padding, windowing and the DFT all are), so STFT(ŝ) - STFT(s) = STFT(ŝ - s): one
transform of the difference per resolution instead of two, half the FFT work and spectrum memory of a training step.
`tests/test_losses.py` checks it against a direct DFT of ŝ and s separately, value and gradient.

The silence term (not in the paper; `train.silence_weight`, 0 by default) is the evaluation's silent-region leakage
(`metrics.silent_leakage`) made a loss: where the target stem is inactive (frames of 50 ms more than 30 dB below
the excerpt's loudest frame, or below -60 dBFS: `metrics.ActivityConfig`), the estimate's energy relative to the
mixture's there, in dB, with a soft floor. The paper's L1 terms weigh a leak in a quiet gap by its amplitude, so
a leak 20 dB below a quiet accompaniment costs almost nothing beside an error under loud singing; in dB every
excerpt's gap counts alike, and halving a leak is worth the same at any level.
"""

from __future__ import annotations

import torch
from torch import nn

from bsmamba2.metrics import ActivityConfig


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


def inactive_frames(target: torch.Tensor, frame: int, config: ActivityConfig = ActivityConfig()) -> torch.Tensor:
    """Where each target stem is silent, by the evaluation's RMS detector (`metrics.vocal_activity`).

    Args:
        target: (batch, stems, channels, time); the time is cut into `frame`-sample frames (a trailing partial frame
            is dropped).
    Returns:
        (batch, stems, frames) bool: the frame's level (RMS over channels and samples, dBFS) is more than
        -config.relative_db below the stem's loudest frame in the excerpt, or below config.absolute_db. A silent
        stem is inactive everywhere.
    """
    frames = target.shape[-1] // frame
    power = target[..., : frames * frame].float().unflatten(-1, (frames, frame)).square().mean(dim=(2, 4))
    level = 10.0 * torch.log10(power)  # (batch, stems, frames); -inf where digitally silent
    peak = level.amax(dim=-1, keepdim=True)
    return level < torch.clamp(peak + config.relative_db, min=config.absolute_db)


class SilentLeakageLoss(nn.Module):
    """Per excerpt and stem, 10·log10(E_est / E_mix + 10^(floor_db/10)) over the stem's inactive frames, where
    E_est and E_mix are the estimate's and the mixture's energy there: `metrics.silent_leakage` in dB with a soft
    floor (below floor_db a leak is inaudible and the gradient fades). The mean over the (excerpt, stem) pairs
    that have inactive frames; 0 when none has."""

    def __init__(self, sample_rate: int = 44100, floor_db: float = -50.0, config: ActivityConfig = ActivityConfig()):
        super().__init__()
        self.frame = max(1, int(round(config.frame_seconds * sample_rate)))  # 2205 samples at 44.1 kHz
        self.floor = 10.0 ** (float(floor_db) / 10.0)
        self.config = config

    def per_item(self, pred: torch.Tensor, target: torch.Tensor, mixture: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, stems) floored leakage in dB, and (batch, stems) bool: the pair has inactive frames."""
        frames = target.shape[-1] // self.frame
        mask = inactive_frames(target, self.frame, self.config).float()  # (batch, stems, frames)

        def energy(x: torch.Tensor) -> torch.Tensor:  # (..., channels, time) -> (..., frames)
            return x[..., : frames * self.frame].float().unflatten(-1, (frames, self.frame)).square().sum(dim=(-3, -1))

        est = (energy(pred) * mask).sum(-1)  # (batch, stems)
        mix = (energy(mixture)[:, None] * mask).sum(-1)  # (batch, stems)
        ratio = est / mix.clamp_min(1e-8)
        return 10.0 * torch.log10(ratio + self.floor), mask.sum(-1) > 0

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mixture: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pred, target: (batch, stems, channels, time); mixture: (batch, channels, time).
        Returns:
            scalar float32 (dB).
        """
        leak, has = self.per_item(pred, target, mixture)
        return (leak * has).sum() / has.sum().clamp_min(1)


class SeparationLoss(nn.Module):
    """time_weight * L1(time) + multi-resolution complex STFT L1 (+ silence_weight * `SilentLeakageLoss`); returns
    (total, {"time": ..., "stft": ..., "silence": ...}) ("silence" in dB, 0 when its weight is 0)."""

    def __init__(
        self,
        time_weight: float = 10.0,
        windows: tuple[int, ...] = (4096, 2048, 1024, 512, 256),
        hop: int = 147,
        min_nfft: int = 2048,
        silence_weight: float = 0.0,
        silence_floor_db: float = -50.0,
        sample_rate: int = 44100,
    ):
        super().__init__()
        self.time_weight = float(time_weight)
        self.stft = MultiResolutionSTFTLoss(windows, hop, min_nfft)
        self.silence_weight = float(silence_weight)
        self.silence = SilentLeakageLoss(sample_rate, silence_floor_db)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mixture: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Args:
            pred, target: (batch, stems, channels, time).
            mixture: (batch, channels, time); needed when the silence term is on.
        Returns:
            total loss (scalar float32) and its parts, detached.
        """
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        with torch.autocast(pred.device.type, enabled=False):
            time = (pred.float() - target.float()).abs().mean()
            spec = self.stft(pred, target)
            total = self.time_weight * time + spec
            silence = time.new_zeros(())
            if self.silence_weight:
                if mixture is None:
                    raise ValueError("the silence term (train.silence_weight > 0) needs the mixture: "
                                     "call the loss as loss(prediction, targets, mixture)")
                silence = self.silence(pred, target, mixture)
                total = total + self.silence_weight * silence
        return total, {"time": time.detach(), "stft": spec.detach(), "silence": silence.detach()}
