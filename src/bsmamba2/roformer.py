"""BS-RoFormer baseline: the same band split and mask estimator as BSMamba2, with transformers in place of Mamba2.

Per axis (time, then bands) each layer is: x + Attention(ScaledL2Norm(x)), then x + FeedForward(ScaledL2Norm(x)). Attention
has rotary position embeddings (one table per axis, shared by all layers, rotating adjacent pairs of each head's
channels) and a per-head sigmoid output gate. Module names follow the official implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bsmamba2.config import RoFormerConfig
from bsmamba2.bandsplit import BandSplitModel
from bsmamba2.spectral import ScaledL2Norm


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over the last dim, rotating adjacent pairs (x0, x1), (x2, x3), ...; θ = 10000."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)  # (dim/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x `(batch, heads, length, dim)` → rotated, same shape; angles in float32."""
        n = x.shape[-2]
        angles = torch.arange(n, device=x.device, dtype=torch.float32)[:, None] * self.inv_freq  # (n, dim/2)
        angles = angles.repeat_interleave(2, dim=-1)  # (n, dim): each angle for a pair
        pairs = x.float().unflatten(-1, (-1, 2))
        rotated_half = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return (x.float() * angles.cos() + rotated_half * angles.sin()).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float, rotary: RotaryEmbedding):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.rotary = [rotary]  # shared across layers; kept out of this module's state dict
        self.norm = ScaledL2Norm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_gates = nn.Linear(dim, heads)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim, bias=False), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        s, n, _ = x.shape
        q, k, v = self.to_qkv(x).view(s, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 × (s, h, n, e)
        rotary = self.rotary[0]
        q, k = rotary(q), rotary(k)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        out = out * self.to_gates(x).transpose(1, 2).unsqueeze(-1).sigmoid()  # (s, h, n, e) · (s, h, n, 1)
        return self.to_out(out.transpose(1, 2).reshape(s, n, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(ScaledL2Norm(dim), nn.Linear(dim, dim * mult), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(dim * mult, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Transformer(nn.Module):
    """One transformer layer along an axis: `(sequences, length, dim)` → same."""

    def __init__(self, cfg: RoFormerConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleList([
            Attention(cfg.dim, cfg.heads, cfg.dim_head, cfg.attn_dropout, rotary),
            FeedForward(cfg.dim, cfg.ff_mult, cfg.ff_dropout),
        ])])

    def forward(self, x: Tensor) -> Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


class BSRoFormer(BandSplitModel):
    """Band-split RoFormer (Lu et al. 2023) as the BSMamba2 paper's baseline."""

    config: RoFormerConfig

    def __init__(self, config: RoFormerConfig | None = None):
        super().__init__(config or RoFormerConfig())

    def make_layer(self) -> nn.ModuleList:
        if not hasattr(self, "time_rotary"):  # one table per axis, shared by all layers
            self.time_rotary = RotaryEmbedding(self.config.dim_head)
            self.band_rotary = RotaryEmbedding(self.config.dim_head)
        return nn.ModuleList([Transformer(self.config, self.time_rotary), Transformer(self.config, self.band_rotary)])

    def branch_outputs(self, layer: nn.ModuleList) -> list[nn.Module]:
        """Each transformer's attention output projection and feed-forward output projection."""
        return [proj for transformer in layer for attn, ff in transformer.layers
                for proj in (attn.to_out[0], ff.net[4])]
