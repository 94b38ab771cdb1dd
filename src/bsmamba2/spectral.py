"""The paper's STFT/iSTFT, the band split (spectrum → per-band latents) and the per-band mask estimator.

Spectra are complex `(batch, channels, freq, frames)`; latents `(batch, frames, bands, dim)`.
Within a band the real-valued features are ordered (freq, channel, real/imag), as in the official model, so that
official weights apply unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bsmamba2 import switches
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


class ScaledL2Norm(nn.Module):
    """The band-split models' norm: L2-normalize, times sqrt(dim), times a learned gain `gamma` (the official code
    calls it RMSNorm; it differs from `mamba2.RMSNorm`, a true RMS with an eps inside the root).

    Without autograd on a GPU with the Triton backend, one kernel (`kernels.norm.l2_scale`) computes the same in
    float32 and writes it once, in the autocast dtype under autocast (where the next product would cast it to
    anyway); the plain form below is its twin and runs everywhere else."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if _inference_kernels(x):
            from bsmamba2.kernels.norm import l2_scale  # noqa: PLC0415

            return l2_scale(x, self.gamma, self.scale, 1e-12, _product_dtype(x, self.gamma))  # F.normalize's eps
        return F.normalize(x, dim=-1) * self.scale * self.gamma


def _inference_kernels(x: Tensor) -> bool:
    """Whether the inference-only Triton kernels apply to x: no autograd, and the Triton backend for its device."""
    return not torch.is_grad_enabled() and switches.resolve_backend(x.device) == "triton"


def _product_dtype(x: Tensor, param: Tensor) -> torch.dtype:
    """The dtype the next product computes in: the autocast dtype under autocast, else x's and param's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, param.dtype)


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


def _stacks(linears: list[nn.Linear], owner: nn.Module, name: str, device_type: str) -> tuple[Tensor, Tensor]:
    """The weights `(g, out, in)` and biases `(g, out, 1)` of a group of same-shaped Linears, stacked here, inside the
    forward, so their gradients flow back to each band's own parameters. Under autocast they are cast to the
    autocast dtype, as `F.linear` casts its weight. Without autograd the stacks and their casts are cached on
    `owner` under `name` (`derived`)."""
    def stack() -> tuple[Tensor, Tensor]:
        return (torch.stack([lin.weight for lin in linears]),  # (g, out, in)
                torch.stack([lin.bias for lin in linears]).unsqueeze(-1))  # (g, out, 1)

    sources = [t for lin in linears for t in (lin.weight, lin.bias)]
    weight, bias = derived(owner, name, sources, stack)
    return in_autocast_dtype(owner, name, sources, (weight, bias), device_type)


def _grouped_linear(x_t: Tensor, linears: list[nn.Linear], owner: nn.Module, name: str,
                    token_major: bool = False) -> Tensor:
    """One batched matmul for a group of same-shaped Linears, feature-major: `(g, in, m)` → `(g, out, m)`, or with
    `token_major` → `(g, m, out)` (the same product with the operands' roles swapped; no copy of either).

    Feature-major (W·xᵀ rather than x·Wᵀ) makes the weight gradient `(g, out, in)`-contiguous, so each band's slice
    becomes its `.grad` without a copy. The stacks come from `_stacks`.
    """
    weight, bias = _stacks(linears, owner, name, x_t.device.type)
    if token_major:
        return torch.baddbmm(bias.transpose(1, 2), x_t.transpose(1, 2), weight.transpose(1, 2))
    return torch.baddbmm(bias, weight, x_t)


def _bias_column_weights(linears: list[nn.Linear], owner: nn.Module, name: str, device_type: str) -> Tensor:
    """`_stacks` with the bias as one more input column of the weight, then zero columns up to a multiple of 8:
    `(g, out, w)`, against inputs with a column of ones after their `in` values (`kernels.norm.l2_scale(ones=True)`
    writes that form). No autograd; cached like the stacks."""
    weight, bias = _stacks(linears, owner, name, device_type)
    g, out, n = weight.shape
    width = (n + 8) // 8 * 8
    sources = [t for lin in linears for t in (lin.weight, lin.bias)]
    return derived(owner, f"{name}+bias/{weight.dtype}", sources,
                   lambda: torch.cat([weight, bias, bias.new_zeros(g, out, width - n - 1)], dim=2))


def _bias_in_product(x_t: Tensor, linears: list[nn.Linear], owner: nn.Module, name: str) -> Tensor:
    """`_grouped_linear` without autograd, with the bias inside the product: `baddbmm` first copies the broadcast
    bias into its whole output and reads it back; here the bias is a column of the weight, against a row of ones
    appended to x. `(g, in, m)` → `(g, out, m)`."""
    wb = _bias_column_weights(linears, owner, name, x_t.device.type)  # (g, out, w)
    n = x_t.shape[1]
    xb = torch.empty(x_t.shape[0], wb.shape[-1], x_t.shape[-1], device=x_t.device, dtype=wb.dtype)  # (g, w, m)
    xb[:, :n].copy_(x_t)
    xb[:, n].fill_(1)
    xb[:, n + 1:].zero_()
    return torch.bmm(wb, xb)


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
    """Per band: ScaledL2Norm over its features, then Linear to `dim`. `(b, t, Σfeat)` → `(b, t, bands, dim)`.

    Parameters live per band (`to_features.{i}.0.gamma`, `to_features.{i}.1.weight/bias`) so official checkpoints
    load by key. `forward_grouped` gives bands of equal feature size one vectorized ScaledL2Norm and one batched matmul,
    a few kernels per group instead of a few per band; `forward_reference` is the plain per-band loop. They are the
    same function up to float rounding (the norm is elementwise-identical, the matmul may sum in another order), under
    autocast too (tests/test_spectral.py). `grouped` picks what `forward` runs: True or False force it; None (default)
    runs grouped except on CPU, where the loop measured faster.
    """

    def __init__(self, dim: int, feature_sizes: tuple[int, ...], grouped: bool | None = None):
        super().__init__(feature_sizes, grouped)
        self.to_features = nn.ModuleList(nn.Sequential(ScaledL2Norm(n), nn.Linear(n, dim)) for n in feature_sizes)

    def forward_reference(self, x: Tensor) -> Tensor:
        """The plain per-band loop."""
        bands = x.split(self.feature_sizes, dim=-1)
        return torch.stack([net(band) for band, net in zip(bands, self.to_features)], dim=-2)

    def forward_grouped(self, x: Tensor) -> Tensor:
        """`forward_reference` with one vectorized ScaledL2Norm and one batched product per group of equal feature size.

        x `(b, t, Σfeat)` → `(b, t, k, d)` with bands before frames in memory (a `(b, k, t, d)` tensor, transposed):
        the time pass that follows reads it as `(b·k, t, d)` sequences without a copy. Each group's product runs
        token-major. Without autograd on the Triton backend, the norm is one kernel that also writes a column of
        ones, the product takes the bias as a weight column, and each group is copied into its bands; elsewhere the
        norm is the plain one, the bias is added, and one `cat` joins the groups."""
        b, t = x.shape[:-1].numel() // x.shape[-2], x.shape[-2]
        k = len(self.feature_sizes)
        inputs = _split_groups(x, -1, self.feature_sizes, self._groups, self._in_order)
        kernel = self._in_order and _inference_kernels(x)
        y, pieces, k0 = None, [], 0
        for (n, idx), xg in zip(self._groups, inputs):
            g = len(idx)
            xg = xg.reshape(b * t, g, n)  # (m, g, n), m = b·t
            norms = [self.to_features[i][0] for i in idx]
            linears = [self.to_features[i][1] for i in idx]
            gamma = derived(self, f"gamma{n}", [norm.gamma for norm in norms],
                            lambda: torch.stack([norm.gamma for norm in norms]))  # (g, n)
            if kernel:  # the norm in one pass, with a column of ones that takes the bias into the product
                from bsmamba2.kernels.norm import l2_scale  # noqa: PLC0415

                xa = l2_scale(xg, gamma, norms[0].scale, 1e-12, _product_dtype(x, gamma), ones=True)  # (m, g, w)
                weight = _bias_column_weights(linears, self, f"linear{n}", x.device.type)  # (g, d, w)
                yg = torch.bmm(xa.transpose(0, 1), weight.transpose(1, 2))  # (g, m, d)
            else:
                xg = F.normalize(xg, dim=-1) * norms[0].scale * gamma  # ScaledL2Norm.forward, same ops, same order
                weight, bias = _stacks(linears, self, f"linear{n}", x.device.type)
                yg = torch.bmm(xg.transpose(0, 1), weight.transpose(1, 2))  # (g, m, d)
            d = yg.shape[-1]
            yg = yg.view(g, b, t, d).transpose(0, 1)  # (b, g, t, d)
            if kernel:  # straight into the group's bands
                if y is None:
                    y = torch.empty(b, k, t, d, device=x.device, dtype=yg.dtype)
                y[:, k0:k0 + g].copy_(yg)
            else:
                pieces.append(yg + bias.view(1, g, 1, d))
            k0 += g
        if y is None:  # (b, k, t, d), bands in group order, then in band order
            y = _band_order(torch.cat(pieces, dim=1), 1, (1,) * k, self._groups, self._in_order)
        return y.transpose(1, 2).reshape(*x.shape[:-1], k, y.shape[-1])  # (b, t, k, d), a view for 3-D x


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

    def _hidden_grouped(self, x: Tensor) -> tuple[Tensor, list[nn.Sequential]]:
        """The MLP's hidden layers, the same shapes in every band, as one batched product each over all bands (the
        bias inside the product without autograd, `_bias_in_product`): x `(..., k, D)` → `(k, hidden, m)`
        feature-major, m = the positions (b·t); and the bands' MLPs."""
        k = x.shape[-2]
        mlps = [net[0] for net in self.to_freqs]
        h = x.reshape(-1, k, x.shape[-1]).permute(1, 2, 0)  # (k, D, m): feature-major
        for j, layer in enumerate(mlps[0][:-1]):  # all but the last Linear
            if isinstance(layer, nn.Linear):
                linear = _grouped_linear if torch.is_grad_enabled() else _bias_in_product
                h = linear(h, [mlp[j] for mlp in mlps], self, f"hidden{j}")  # (k, hidden, m)
            else:
                assert isinstance(layer, nn.Tanh), layer
                h = h.tanh_()  # in place on the matmul's output, which backward does not need
        return h, mlps

    def forward_grouped(self, x: Tensor) -> Tensor:
        """`forward_reference` with one `baddbmm` per hidden layer, then one per group for the last layer."""
        h, mlps = self._hidden_grouped(x)
        outs = []
        for (n, idx), hg in zip(self._groups, _split_groups(h, 0, (1,) * len(mlps), self._groups, self._in_order)):
            y = F.glu(_grouped_linear(hg, [mlps[i][-1] for i in idx], self, f"last{n}"), dim=1)  # (g, n, m)
            outs.append(y.permute(2, 0, 1).reshape(y.shape[-1], len(idx) * n))  # (m, g·n)
        y = torch.cat(outs, dim=-1)  # (m, Σfeat), bands in group order
        y = _band_order(y, -1, self.feature_sizes, self._groups, self._in_order)
        return y.reshape(*x.shape[:-2], y.shape[-1])

    def forward_spec(self, x: Tensor, audio_channels: int) -> Tensor:
        """The masks as a complex spectrum: latents `(b, t, k, D)` → `(b, c, f, t)` complex64, the same function as
        `features_to_spec(self(x), audio_channels)`.

        On the grouped path (bands in order) each group's last Linear runs token-major and its GLU output is
        written straight to the bins it covers, in the memory order of `stft`'s output (frequency fastest, then
        frames). So the masks cost no concatenation, and their product with the mixture's spectrum and the iSTFT
        read both operands in one order."""
        if not (_use_grouped(self.grouped, x) and self._in_order):
            return features_to_spec(self(x), audio_channels)
        b, t = x.shape[:2]
        h, mlps = self._hidden_grouped(x)
        bins = sum(self.feature_sizes) // (2 * audio_channels)
        out = torch.empty(b, audio_channels, t, bins, 2, device=x.device, dtype=torch.float32)  # (b, c, t, f, re/im)
        f0 = 0
        for (n, idx), hg in zip(self._groups, _split_groups(h, 0, (1,) * len(mlps), self._groups, True)):
            g, w = len(idx), n // (2 * audio_channels)  # bands in the group, bins per band
            y = F.glu(_grouped_linear(hg, [mlps[i][-1] for i in idx], self, f"last{n}", token_major=True), dim=-1)
            y = y.view(g, b, t, w, audio_channels, 2).permute(1, 4, 2, 0, 3, 5)  # (b, c, t, g, w, 2)
            out[:, :, :, f0:f0 + g * w].unflatten(3, (g, w)).copy_(y)
            f0 += g * w
        return torch.view_as_complex(out).transpose(-1, -2)  # (b, c, f, t), frequency fastest in memory
