"""BSMamba2 (Kim & Choi 2025): the band-split skeleton (`bandsplit.py`) with bidirectional Mamba2 blocks along time
and along bands.

Shapes: latents `(b, t, k, d)` with k = bands. At inference the layers keep the latent in the layout each pass reads
(`_layers_without_copies`), and the fused GPU blocks chain their pre-norms; with autograd, or for the baseline, the
skeleton's plain loop runs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bsmamba2.bandsplit import BandSplitModel
from bsmamba2.config import BSMamba2Config
from bsmamba2.mamba2 import BiMamba2Block


class BSMamba2(BandSplitModel):
    """BSMamba2 (Kim & Choi 2025): bidirectional Mamba2 blocks along time and along bands."""

    config: BSMamba2Config

    def __init__(self, config: BSMamba2Config | None = None):
        super().__init__(config or BSMamba2Config())

    def make_layer(self) -> nn.ModuleList:
        d, m = self.config.dim, self.config.mamba
        return nn.ModuleList([BiMamba2Block(d, m), BiMamba2Block(d, m)])

    def branch_outputs(self, layer: nn.ModuleList) -> list[nn.Module]:
        """Each block's 2D → D merge of its two directions (`BiMamba2Block.linear`), added to the block's input."""
        return [block.linear for block in layer]

    def _writes_into_layouts(self) -> bool:
        """Whether `run_layers` takes `_layers_without_copies`: at inference (every BiMamba2Block takes `out=`)."""
        return not torch.is_grad_enabled()

    def run_layers(self, x: Tensor) -> Tensor:
        """`BandSplitModel.run_layers`; at inference as `_layers_without_copies` (same function, fewer copies)."""
        return self._layers_without_copies(x) if self._writes_into_layouts() else super().run_layers(x)

    def _layers_without_copies(self, x: Tensor) -> Tensor:
        """The layers of `forward` with the latent kept in the layout its next pass reads: (b, k, t, d) before a time
        pass, (b, t, k, d) before a band pass. Each module's residual add writes its output straight into the next
        layout (`out=`), so the two transposes per layer of `_along_time` become strided writes of adds that run
        anyway. Same function, inference only."""
        b, t, k, d = x.shape
        # Where every block's last pass can also write the next block's pre-norm (`fuses_prenorm`), each block
        # writes it beside its output (same layout), and the next block reads it instead of normalizing again.
        prenorm = all(m.fuses_prenorm(x) for layer in self.layers for m in layer)

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
