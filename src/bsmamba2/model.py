"""BSMamba2: band split → dual-path (time, then band) sequence layers → per-band mask estimation.

Shapes: spectra `(b, c, f, t)` complex; latents `(b, t, k, d)` with k = bands; waveforms `(b, c, time)`.
The sequence layers are the only difference between BSMamba2 and the BS-RoFormer baseline (`roformer.py`);
everything else lives in `BandSplitModel`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from bsmamba2.config import BSMamba2Config, ModelConfig, RoFormerConfig
from bsmamba2.mamba2 import BiMamba2Block
from bsmamba2.spectral import BandSplit, MaskEstimator, RMSNorm, band_feature_sizes, istft, spec_to_features, stft


class BandSplitModel(nn.Module):
    """Common skeleton. Subclasses provide `make_layer() -> nn.ModuleList([time_module, band_module])`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if sum(config.band_widths) != config.stft.n_fft // 2 + 1:
            raise ValueError(f"band widths sum to {sum(config.band_widths)}, expected {config.stft.n_fft // 2 + 1} bins")
        self.config = config
        self.audio_channels = 2 if config.stereo else 1
        self.stems = tuple(config.stems)
        self.sample_rate = config.stft.sample_rate
        self.activation_checkpointing: bool | frozenset[tuple[int, int]] = False  # see `_checkpoints`
        sizes = band_feature_sizes(config.band_widths, self.audio_channels)
        self.layers = nn.ModuleList(self.make_layer() for _ in range(config.depth))
        self.final_norm = RMSNorm(config.dim)
        self.band_split = BandSplit(config.dim, sizes)
        self.mask_estimators = nn.ModuleList(
            MaskEstimator(config.dim, sizes, depth=config.mask_estimator_depth) for _ in self.stems
        )

    def make_layer(self) -> nn.ModuleList:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def _along_time(x: Tensor, module: nn.Module) -> Tensor:
        b, t, k, d = x.shape
        y = module(x.transpose(1, 2).reshape(b * k, t, d))  # (b·k, t, d): one sequence per band, along time
        return y.reshape(b, k, t, d).transpose(1, 2)  # (b, t, k, d)

    @staticmethod
    def _along_bands(x: Tensor, module: nn.Module) -> Tensor:
        b, t, k, d = x.shape
        return module(x.reshape(b * t, k, d)).reshape(b, t, k, d)  # (b·t, k, d): one sequence per frame

    def _writes_into_layouts(self) -> bool:
        """Inference with modules that take `out=` (BiMamba2Block): `_layers_without_copies` applies."""
        return not torch.is_grad_enabled() and all(getattr(m, "writes_into_out", False)
                                                    for layer in self.layers for m in layer)

    def _layers_without_copies(self, x: Tensor) -> Tensor:
        """The layers of `forward` with the latent kept in the layout its next pass reads: (b, k, t, d) before a time
        pass, (b, t, k, d) before a band pass. Each module's residual add writes its output straight into the next
        layout (`out=`), so the two transposes per layer of `_along_time` become strided writes of adds that run
        anyway. Same function, inference only."""
        b, t, k, d = x.shape
        # Where every block's last pass can also write the next block's pre-norm (`fuses_prenorm`), each block
        # writes it beside its output (same layout), and the next block reads it instead of normalizing again.
        prenorm = all(getattr(m, "fuses_prenorm", lambda _: False)(x) for layer in self.layers for m in layer)

        def new(*shape: int) -> Tensor:
            return torch.empty(*shape, device=x.device, dtype=x.dtype)

        def hints(xn: Tensor | None, shape: tuple[int, ...], xn_next: Tensor | None, next_module) -> dict:
            if not prenorm:
                return {}
            return dict(x_scaled=None if xn is None else xn.view(shape),
                        scaled=None if xn_next is None else (xn_next, next_module.prenorm_eps))

        x_bk, xn_bk = x.transpose(1, 2).contiguous(), None  # (b, k, t, d)
        for i, (time_module, band_module) in enumerate(self.layers):
            x_bt, xn_bt = new(b, t, k, d), new(b, t, k, d) if prenorm else None
            time_module(x_bk.view(b * k, t, d), out=x_bt.transpose(1, 2),  # (b, k, t, d) view of x_bt
                        **hints(xn_bk, (b * k, t, d), None if xn_bt is None else xn_bt.transpose(1, 2), band_module))
            if i == len(self.layers) - 1:
                return band_module(x_bt.view(b * t, k, d), **hints(xn_bt, (b * t, k, d), None, None)).view(b, t, k, d)
            x_bk, xn_bk = new(b, k, t, d), new(b, k, t, d) if prenorm else None
            next_time = self.layers[i + 1][0]
            band_module(x_bt.view(b * t, k, d), out=x_bk.transpose(1, 2),  # (b, t, k, d) view of x_bk
                        **hints(xn_bt, (b * t, k, d), None if xn_bk is None else xn_bk.transpose(1, 2), next_time))
        return x  # no layers

    def _checkpoints(self, layer: int, axis: int) -> bool:
        """Whether layer `layer`'s time-axis (axis 0) or band-axis (axis 1) module recomputes its activations in
        backward. `activation_checkpointing` is True (all), False (none) or a set of (layer, axis) pairs."""
        chosen = self.activation_checkpointing
        return chosen if isinstance(chosen, bool) else (layer, axis) in chosen

    def _run(self, fn, x: Tensor, module: nn.Module, checkpointed: bool) -> Tensor:
        # Activation checkpointing per axis module: only one module's intermediates are alive at a time.
        if checkpointed and self.training and torch.is_grad_enabled():
            return checkpoint(fn, x, module, use_reentrant=False)
        return fn(x, module)

    def forward(self, spec: Tensor) -> Tensor:
        """Complex spectrum `(b, c, f, t)` → masked complex spectra `(b, stems, c, f, t)`."""
        if spec.dim() != 4 or spec.shape[1] != self.audio_channels or not spec.is_complex():
            raise ValueError(f"expected a complex spectrum (batch, {self.audio_channels}, freq, frames), "
                             f"got {tuple(spec.shape)} {spec.dtype}")
        feats = spec_to_features(spec)  # (b, t, f·c·2)
        x = self.band_split(feats)  # (b, t, k, d)
        if self._writes_into_layouts():
            x = self._layers_without_copies(x)
        else:
            for i, (time_module, band_module) in enumerate(self.layers):
                x = self._run(self._along_time, x, time_module, self._checkpoints(i, 0))
                x = self._run(self._along_bands, x, band_module, self._checkpoints(i, 1))
        x = self.final_norm(x)
        masks = [est.forward_spec(x, self.audio_channels) for est in self.mask_estimators]  # n × (b, c, f, t)
        # stacked in their own memory order (frequency fastest on the grouped path, as the mixture's spectrum)
        masks = torch.stack([m.transpose(-1, -2) for m in masks], dim=1).transpose(-1, -2)  # (b, n, c, f, t)
        return spec.unsqueeze(1) * masks

    def stft(self, wave: Tensor) -> Tensor:
        """`(..., time)` → `(..., f, frames)` with the model's STFT settings."""
        return stft(wave, self.config.stft)

    def istft(self, spec: Tensor, length: int) -> Tensor:
        return istft(spec, self.config.stft, length)

    def forward_waveform(self, wave: Tensor) -> Tensor:
        """Waveform `(b, c, time)` → separated stems `(b, stems, c, time)`, same length."""
        if wave.dim() != 3 or wave.shape[1] != self.audio_channels:
            raise ValueError(f"expected a waveform (batch, {self.audio_channels}, time), got {tuple(wave.shape)}")
        return self.istft(self(self.stft(wave)), wave.shape[-1])


class BSMamba2(BandSplitModel):
    """BSMamba2 (Kim & Choi 2025): bidirectional Mamba2 blocks along time and along bands."""

    config: BSMamba2Config

    def __init__(self, config: BSMamba2Config | None = None):
        super().__init__(config or BSMamba2Config())

    def make_layer(self) -> nn.ModuleList:
        d, m = self.config.dim, self.config.mamba
        return nn.ModuleList([BiMamba2Block(d, m), BiMamba2Block(d, m)])


def build_model(config: ModelConfig) -> BandSplitModel:
    """The model class that `config` describes (BSMamba2 or BS-RoFormer)."""
    if isinstance(config, BSMamba2Config):
        return BSMamba2(config)
    if isinstance(config, RoFormerConfig):
        from bsmamba2.roformer import BSRoFormer  # noqa: PLC0415

        return BSRoFormer(config)
    raise TypeError(f"not a model config: {type(config).__name__}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
