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
from bsmamba2.derived import derived, in_autocast_dtype


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


def _band_groups(feature_sizes: tuple[int, ...]) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """Bands grouped by feature size, groups in order of first appearance: `((size, (band, ...)), ...)`."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(feature_sizes):
        groups.setdefault(n, []).append(i)
    return tuple((n, tuple(idx)) for n, idx in groups.items())


def _in_band_order(groups: tuple[tuple[int, tuple[int, ...]], ...]) -> bool:
    """True when concatenating the groups' bands gives 0, 1, 2, …: every group a run, runs in order."""
    order = [i for _, idx in groups for i in idx]
    return order == list(range(len(order)))


def _split_groups(x: Tensor, dim: int, band_sizes: tuple[int, ...], groups, in_order: bool) -> list[Tensor]:
    """Cut `x` along `dim` (band b spanning `band_sizes[b]` entries) into one piece per group, its bands in order.

    One `split` (views, and a single cat in backward) when the groups are runs in band order; else a cat per group.
    """
    if in_order:
        return list(x.split([sum(band_sizes[i] for i in idx) for _, idx in groups], dim=dim))
    pieces = x.split(band_sizes, dim=dim)
    return [torch.cat([pieces[i] for i in idx], dim=dim) for _, idx in groups]


def _band_order(y: Tensor, dim: int, band_sizes: tuple[int, ...], groups, in_order: bool) -> Tensor:
    """Inverse of `_split_groups` for the outputs: group-ordered `y` back to band order along `dim`."""
    if in_order:
        return y
    pieces = y.split([band_sizes[i] for _, idx in groups for i in idx], dim=dim)
    where = {i: j for j, i in enumerate(i for _, idx in groups for i in idx)}
    return torch.cat([pieces[where[i]] for i in range(len(band_sizes))], dim=dim)


def _use_grouped(grouped: bool | None, x: Tensor) -> bool:
    # On a GPU the grouped path saves ~1000 small kernel launches per forward (as many in backward). On CPU the op
    # count hardly matters and the loop, whose temporaries stay cache-sized, measured 1.2-2x faster at D = 256.
    return grouped if grouped is not None else x.device.type != "cpu"


def _grouped_linear(x_t: Tensor, linears: list[nn.Linear], owner: nn.Module, name: str) -> Tensor:
    """One batched matmul for a group of same-shaped Linears, feature-major: `(g, in, m)` → `(g, out, m)`.

    The weights are stacked here, inside the forward, so their gradients flow back to each band's own parameters.
    Feature-major (W·xᵀ rather than x·Wᵀ) makes the weight gradient `(g, out, in)`-contiguous, so each band's slice
    becomes its `.grad` without a copy. Under autocast the stacks are cast to the autocast dtype, as `F.linear`
    casts its weight. Without autograd the stacks and their casts are cached on `owner` under `name` (`derived`).
    """
    def stack() -> tuple[Tensor, Tensor]:
        return (torch.stack([lin.weight for lin in linears]),  # (g, out, in)
                torch.stack([lin.bias for lin in linears]).unsqueeze(-1))  # (g, out, 1)

    sources = [t for lin in linears for t in (lin.weight, lin.bias)]
    weight, bias = derived(owner, name, sources, stack)
    weight, bias = in_autocast_dtype(owner, name, sources, (weight, bias), x_t.device.type)
    return torch.baddbmm(bias, weight, x_t)


class _PerBand(nn.Module):
    """Per-band layers with two ways to run them: `forward_reference` (a loop over bands, the plain twin) and
    `forward_grouped` (bands of equal feature size batched). `grouped`: True or False force one; None runs grouped
    except on CPU."""

    def __init__(self, feature_sizes: tuple[int, ...], grouped: bool | None):
        super().__init__()
        self.feature_sizes = tuple(feature_sizes)
        self.grouped = grouped
        self._groups = _band_groups(self.feature_sizes)
        self._in_order = _in_band_order(self._groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_grouped(x) if _use_grouped(self.grouped, x) else self.forward_reference(x)

    def forward_reference(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_grouped(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class BandSplit(_PerBand):
    """Per band: RMSNorm over its features, then Linear to `dim`. `(b, t, Σfeat)` → `(b, t, bands, dim)`.

    Parameters live per band (`to_features.{i}.0.gamma`, `to_features.{i}.1.weight/bias`) so official checkpoints
    load by key. `forward_grouped` gives bands of equal feature size one vectorized RMSNorm and one batched matmul,
    a few kernels per group instead of a few per band; `forward_reference` is the plain per-band loop. They are the
    same function up to float rounding (the norm is elementwise-identical, the matmul may sum in another order), under
    autocast too (tests/test_spectral.py). `grouped` picks what `forward` runs: True or False force it; None (default)
    runs grouped except on CPU, where the loop measured faster.
    """

    def __init__(self, dim: int, feature_sizes: tuple[int, ...], grouped: bool | None = None):
        super().__init__(feature_sizes, grouped)
        self.to_features = nn.ModuleList(nn.Sequential(RMSNorm(n), nn.Linear(n, dim)) for n in feature_sizes)

    def forward_reference(self, x: Tensor) -> Tensor:
        """The plain per-band loop."""
        bands = x.split(self.feature_sizes, dim=-1)
        return torch.stack([net(band) for band, net in zip(bands, self.to_features)], dim=-2)

    def forward_grouped(self, x: Tensor) -> Tensor:
        """`forward_reference` with one vectorized RMSNorm and one `baddbmm` per group of equal feature size."""
        lead = x.shape[:-1]
        inputs = _split_groups(x, -1, self.feature_sizes, self._groups, self._in_order)
        outs = []
        for (n, idx), xg in zip(self._groups, inputs):
            xg = xg.reshape(-1, len(idx), n)  # (m, g, n), m = b·t
            norms = [self.to_features[i][0] for i in idx]
            gamma = derived(self, f"gamma{n}", [norm.gamma for norm in norms],
                            lambda: torch.stack([norm.gamma for norm in norms]))  # (g, n)
            xg = F.normalize(xg, dim=-1) * norms[0].scale * gamma  # RMSNorm.forward, same ops in the same order
            y = _grouped_linear(xg.permute(1, 2, 0), [self.to_features[i][1] for i in idx], self,
                                f"linear{n}")  # (g, d, m)
            outs.append(y.permute(2, 0, 1))  # (m, g, d)
        y = torch.cat(outs, dim=1)  # (m, k, d), bands in group order
        y = _band_order(y, 1, (1,) * len(self.feature_sizes), self._groups, self._in_order)
        return y.reshape(*lead, *y.shape[1:])  # (b, t, k, d)


def _mlp(dim_in: int, dim_hidden: int, dim_out: int, depth: int) -> nn.Sequential:
    dims = [dim_in] + [dim_hidden] * (depth - 1) + [dim_out]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class MaskEstimator(_PerBand):
    """Per band: MLP (Linear D→4D, Tanh, Linear 4D→2·feat) then GLU. `(b, t, bands, D)` → `(b, t, Σfeat)`.

    Parameters live per band (`to_freqs.{i}.0.{j}.weight/bias`, j indexing the MLP's layers) so official checkpoints
    load by key. `forward_grouped` runs the MLP's hidden layers, the same shape in every band, as one batched matmul
    over all bands, and the last Linear and the GLU, whose size follows the band's, as one batched matmul per group
    of equal feature size; `forward_reference` is the plain per-band loop. They are the same function up to float
    rounding (the matmuls may sum in another order), under autocast too (tests/test_spectral.py). `grouped` picks
    what `forward` runs: True or False force it; None (default) runs grouped except on CPU, where the loop measured
    faster and keeps one band's hidden activations alive at a time instead of all bands'.
    """

    def __init__(self, dim: int, feature_sizes: tuple[int, ...], depth: int = 2, expansion: int = 4,
                 grouped: bool | None = None):
        super().__init__(feature_sizes, grouped)
        self.to_freqs = nn.ModuleList(
            nn.Sequential(_mlp(dim, dim * expansion, 2 * n, depth), nn.GLU(dim=-1)) for n in feature_sizes
        )

    def forward_reference(self, x: Tensor) -> Tensor:
        """The plain per-band loop."""
        return torch.cat([net(band) for band, net in zip(x.unbind(dim=-2), self.to_freqs)], dim=-1)

    def forward_grouped(self, x: Tensor) -> Tensor:
        """`forward_reference` with one `baddbmm` per hidden layer, then one per group for the last layer."""
        lead, k = x.shape[:-2], x.shape[-2]
        mlps = [net[0] for net in self.to_freqs]
        h = x.reshape(-1, k, x.shape[-1]).permute(1, 2, 0)  # (k, D, m), m = b·t: feature-major
        for j, layer in enumerate(mlps[0][:-1]):  # all but the last Linear: same shapes in every band
            if isinstance(layer, nn.Linear):
                h = _grouped_linear(h, [mlp[j] for mlp in mlps], self, f"hidden{j}")  # (k, hidden, m)
            else:
                assert isinstance(layer, nn.Tanh), layer
                h = h.tanh_()  # in place on the matmul's output, which backward does not need
        bands = (1,) * k
        outs = []
        for (n, idx), hg in zip(self._groups, _split_groups(h, 0, bands, self._groups, self._in_order)):
            y = F.glu(_grouped_linear(hg, [mlps[i][-1] for i in idx], self, f"last{n}"), dim=1)  # (g, n, m)
            outs.append(y.permute(2, 0, 1).reshape(y.shape[-1], len(idx) * n))  # (m, g·n)
        y = torch.cat(outs, dim=-1)  # (m, Σfeat), bands in group order
        y = _band_order(y, -1, self.feature_sizes, self._groups, self._in_order)
        return y.reshape(*lead, y.shape[-1])
