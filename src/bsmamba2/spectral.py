"""The paper's STFT/iSTFT, the band split (spectrum → per-band latents) and the per-band mask estimator.

Spectra are complex `(batch, channels, freq, frames)`; latents `(batch, frames, bands, dim)`.
Within a band the real-valued features are ordered (freq, channel, real/imag), as in the official model, so that
official weights apply unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bsmamba2.config import STFTConfig


def _window(cfg: STFTConfig, device: torch.device) -> Tensor:
    return torch.hann_window(cfg.n_fft, periodic=True, device=device, dtype=torch.float32)


def stft(wave: Tensor, cfg: STFTConfig | None = None) -> Tensor:
    """Complex STFT with periodic Hann, center=True and reflect padding (torchaudio's Spectrogram(power=None)).

    Args:
        wave: `(..., time)` real waveform.
    Returns:
        `(..., n_fft // 2 + 1, frames)` complex64, frames = time // hop_length + 1.
    """
    cfg = cfg or STFTConfig()
    lead = wave.shape[:-1]
    flat = wave.reshape(-1, wave.shape[-1]).float()  # STFT always in float32, also under autocast
    if flat.shape[-1] <= cfg.n_fft // 2:
        # reflect padding needs more samples than the pad; zero-extend very short inputs first
        flat = F.pad(flat, (0, cfg.n_fft // 2 + 1 - flat.shape[-1]))
    with torch.autocast(device_type=flat.device.type, enabled=False):
        spec = torch.stft(
            flat, cfg.n_fft, cfg.hop_length, window=_window(cfg, flat.device),
            center=True, pad_mode="reflect", normalized=False, onesided=True, return_complex=True,
        )
    return spec.reshape(*lead, *spec.shape[-2:])


def istft(spec: Tensor, cfg: STFTConfig | None = None, length: int | None = None) -> Tensor:
    """Inverse of `stft`. `spec`: `(..., freq, frames)` complex → `(..., length)` float32."""
    cfg = cfg or STFTConfig()
    lead = spec.shape[:-2]
    flat = spec.reshape(-1, *spec.shape[-2:]).to(torch.complex64)
    with torch.autocast(device_type=flat.device.type, enabled=False):
        wave = torch.istft(
            flat, cfg.n_fft, cfg.hop_length, window=_window(cfg, flat.device), center=True, length=length,
        )
    return wave.reshape(*lead, wave.shape[-1])


class RMSNorm(nn.Module):
    """The official band-split RMSNorm: L2-normalize, times sqrt(dim), times a learned gain `gamma`."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) * self.scale * self.gamma


def band_feature_sizes(band_widths: tuple[int, ...], audio_channels: int) -> tuple[int, ...]:
    """Real features per band: bins × channels × (real, imag)."""
    return tuple(2 * w * audio_channels for w in band_widths)


def spec_to_features(spec: Tensor) -> Tensor:
    """`(b, c, f, t)` complex → `(b, t, f·c·2)` real, ordered (f, c, re/im) as the official model."""
    x = torch.view_as_real(spec)  # (b, c, f, t, 2)
    b, c, f, t, _ = x.shape
    return x.permute(0, 3, 2, 1, 4).reshape(b, t, f * c * 2)


def features_to_spec(x: Tensor, audio_channels: int) -> Tensor:
    """Inverse of `spec_to_features` with leading dims kept: `(..., t, f·c·2)` real → `(..., c, f, t)` complex."""
    *lead, t, fc2 = x.shape
    f = fc2 // (2 * audio_channels)
    x = x.float().reshape(*lead, t, f, audio_channels, 2)
    x = torch.view_as_complex(x.contiguous())  # (..., t, f, c)
    n = len(lead)
    return x.permute(*range(n), n + 2, n + 1, n)  # (..., c, f, t)


class BandSplit(nn.Module):
    """Per band: RMSNorm over its features, then Linear to `dim`. `(b, t, Σfeat)` → `(b, t, bands, dim)`."""

    def __init__(self, dim: int, feature_sizes: tuple[int, ...]):
        super().__init__()
        self.feature_sizes = tuple(feature_sizes)
        self.to_features = nn.ModuleList(nn.Sequential(RMSNorm(n), nn.Linear(n, dim)) for n in feature_sizes)

    def forward(self, x: Tensor) -> Tensor:
        bands = x.split(self.feature_sizes, dim=-1)
        return torch.stack([net(band) for band, net in zip(bands, self.to_features)], dim=-2)


def _mlp(dim_in: int, dim_hidden: int, dim_out: int, depth: int) -> nn.Sequential:
    dims = [dim_in] + [dim_hidden] * (depth - 1) + [dim_out]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class MaskEstimator(nn.Module):
    """Per band: MLP (Linear D→4D, Tanh, Linear 4D→2·feat) then GLU. `(b, t, bands, D)` → `(b, t, Σfeat)`."""

    def __init__(self, dim: int, feature_sizes: tuple[int, ...], depth: int = 2, expansion: int = 4):
        super().__init__()
        self.to_freqs = nn.ModuleList(
            nn.Sequential(_mlp(dim, dim * expansion, 2 * n, depth), nn.GLU(dim=-1)) for n in feature_sizes
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([net(band) for band, net in zip(x.unbind(dim=-2), self.to_freqs)], dim=-1)
