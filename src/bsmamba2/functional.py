"""Plain-PyTorch helpers shared by the model code and by the kernels' reference twins.

A leaf module: it imports no other bsmamba2 module, so `kernels/` may use these as its plain twins without
importing model code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half inputs (decays must not be computed in bf16), float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


def expand_groups(t: Tensor, heads: int) -> Tensor:
    """(b, l, g, n) → (b, l, h, n): each group serves h/g consecutive heads."""
    g = t.shape[2]
    if heads % g:
        raise ValueError(f"heads ({heads}) must be a multiple of groups ({g})")
    return t.repeat_interleave(heads // g, dim=2)


def rms_scale(x: Tensor, eps: float) -> Tensor:
    """x · rsqrt(mean(x²) + eps) over the last dimension in float32, in x's dtype: `mamba2.RMSNorm` without its
    gain."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def causal_depthwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Causal depthwise conv1d along the sequence, in (b, l, c) layout: out_t = Σ_k w_k · x_{t-K+1+k} + bias.

    Same result as `nn.Conv1d(c, c, K, groups=c, padding=K-1)` on (b, c, l) cut to the first l outputs, without the
    two transposes. `weight`: (c, 1, K).
    """
    l, k = x.shape[1], weight.shape[-1]
    xp = F.pad(x, (0, 0, k - 1, 0))  # (b, l + K - 1, c): K-1 zeros in front
    out = xp[:, :l] * weight[:, 0, 0]
    for i in range(1, k):
        out = torch.addcmul(out, xp[:, i:i + l], weight[:, 0, i])
    return out if bias is None else out + bias


def causal_depthwise_conv_channels_last(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`causal_depthwise_conv` as one depthwise conv2d over a channels-last view: on x86 CPUs oneDNN runs it in a
    single pass, about 10× the shifted sum there (which reads and writes the activation once per tap).

    x `(b, l, c)` is seen as an NCHW tensor `(b, c, 1, l)` in channels-last memory (no copy when x is contiguous);
    the K-1 extra outputs of the symmetric padding are cut off. Returns `(b, l, c)`.
    """
    b, l, c = x.shape
    k = weight.shape[-1]
    x4 = x.contiguous().view(b, 1, l, c).permute(0, 3, 1, 2)  # (b, c, 1, l), channels-last strides
    y = F.conv2d(x4, weight.view(c, 1, 1, k), bias, padding=(0, k - 1), groups=c)  # (b, c, 1, l + K - 1)
    return y[..., :l].permute(0, 2, 3, 1).reshape(b, l, c)
