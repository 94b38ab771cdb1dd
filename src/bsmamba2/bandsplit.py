"""The band-split skeleton shared by BSMamba2 and the BS-RoFormer baseline: band split → dual-path sequence layers
(time, then bands) → final norm → per-band mask estimation.

Shapes: spectra `(b, c, f, t)` complex; latents `(b, t, k, d)` with k = bands; waveforms `(b, c, time)`.
The sequence layers are the only difference between the two models (`model.py`, `roformer.py`); each supplies them
through `make_layer`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from bsmamba2.config import ModelConfig
from bsmamba2.spectral import BandSplit, MaskEstimator, ScaledL2Norm, band_feature_sizes, istft, spec_to_features, stft


class BandSplitModel(nn.Module):
    """Common skeleton. Subclasses provide `make_layer() -> nn.ModuleList([time_module, band_module])`, each module
    mapping `(sequences, length, dim)` → same."""

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
        self.final_norm = ScaledL2Norm(config.dim)
        self.band_split = BandSplit(config.dim, sizes)
        self.mask_estimators = nn.ModuleList(
            MaskEstimator(config.dim, sizes, depth=config.mask_estimator_depth) for _ in self.stems
        )

    def make_layer(self) -> nn.ModuleList:  # pragma: no cover - abstract
        raise NotImplementedError

    def branch_outputs(self, layer: nn.ModuleList) -> list[nn.Module]:  # pragma: no cover - abstract
        """The last projection of every residual branch in `layer` (each module adds its branches to its input)."""
        raise NotImplementedError

    def make_identity(self, index: int) -> None:
        """Make layer `index` pass its input through unchanged: zero the weights and biases of its residual branches'
        last projections. Growing a trained model deeper (`train.grow_depth`): the deeper model starts computing what
        the trained one did, and training moves the new layers from there (their projections get gradients at once)."""
        with torch.no_grad():
            for proj in self.branch_outputs(self.layers[index]):
                proj.weight.zero_()
                if proj.bias is not None:
                    proj.bias.zero_()

    @staticmethod
    def _along_time(x: Tensor, module: nn.Module) -> Tensor:
        b, t, k, d = x.shape
        y = module(x.transpose(1, 2).reshape(b * k, t, d))  # (b·k, t, d): one sequence per band, along time
        return y.reshape(b, k, t, d).transpose(1, 2)  # (b, t, k, d)

    @staticmethod
    def _along_bands(x: Tensor, module: nn.Module) -> Tensor:
        b, t, k, d = x.shape
        return module(x.reshape(b * t, k, d)).reshape(b, t, k, d)  # (b·t, k, d): one sequence per frame

    def _checkpoints(self, layer: int, axis: int) -> bool:
        """Whether layer `layer`'s time-axis (axis 0) or band-axis (axis 1) module recomputes its activations in
        backward. `activation_checkpointing` is True (all), False (none) or a set of (layer, axis) pairs."""
        chosen = self.activation_checkpointing
        return chosen if isinstance(chosen, bool) else (layer, axis) in chosen

    @property
    def can_keep_conv_outputs(self) -> bool:
        """Whether the axis modules can keep their conv output for backward (BSMamba2's blocks)."""
        return all(hasattr(m, "keep_conv_output") for layer in self.layers for m in layer)

    @property
    def kept_conv_outputs(self) -> frozenset[tuple[int, int]]:
        """The (layer, axis) pairs whose axis module keeps its conv output for backward instead of recomputing it
        there (BSMamba2 training on the fast path: faster, more memory; `bsmamba2.memory` chooses them). Never
        changes a value."""
        return frozenset((i, axis) for i, layer in enumerate(self.layers) for axis, m in enumerate(layer)
                         if getattr(m, "keep_conv_output", False))

    @kept_conv_outputs.setter
    def kept_conv_outputs(self, chosen: frozenset[tuple[int, int]]) -> None:
        if chosen and not self.can_keep_conv_outputs:
            raise ValueError(f"{type(self).__name__}'s axis modules have no conv output to keep")
        for i, layer in enumerate(self.layers):
            for axis, m in enumerate(layer):
                if hasattr(m, "keep_conv_output"):
                    m.keep_conv_output = (i, axis) in chosen

    def _run(self, fn, x: Tensor, module: nn.Module, checkpointed: bool) -> Tensor:
        # Activation checkpointing per axis module: only one module's intermediates are alive at a time.
        if checkpointed and self.training and torch.is_grad_enabled():
            return checkpoint(fn, x, module, use_reentrant=False)
        return fn(x, module)

    def run_layers(self, x: Tensor) -> Tensor:
        """The dual-path layers on the latent `(b, t, k, d)` → `(b, t, k, d)`: per layer, the time module along
        time, then the band module along bands. A subclass may override it with a faster form of the same
        function (BSMamba2 does, for inference)."""
        for i, (time_module, band_module) in enumerate(self.layers):
            x = self._run(self._along_time, x, time_module, self._checkpoints(i, 0))
            x = self._run(self._along_bands, x, band_module, self._checkpoints(i, 1))
        return x

    def forward(self, spec: Tensor) -> Tensor:
        """Complex spectrum `(b, c, f, t)` → masked complex spectra `(b, stems, c, f, t)`."""
        if spec.dim() != 4 or spec.shape[1] != self.audio_channels or not spec.is_complex():
            raise ValueError(f"expected a complex spectrum (batch, {self.audio_channels}, freq, frames), "
                             f"got {tuple(spec.shape)} {spec.dtype}")
        feats = spec_to_features(spec)  # (b, t, f·c·2)
        x = self.band_split(feats)  # (b, t, k, d)
        x = self.run_layers(x)  # (b, t, k, d)
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
