"""The scan's inputs laid out as the model lays them out, for the kernel A/B (`ab_scan.py`) and the sm_90a compile
statistics (`sm90_loop_stats.py`): views of one conv output (time axis, and both axes in training) or of one
in-projection (band axis at inference), paper size by default (16 heads of 64, d_state 128, bf16); and the
backward's output gradient and gradient buffers as the mixer's backward passes them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def scan_inputs(seqs: int, length: int, heads: int = 16, headdim: int = 64, d_state: int = 128, seed: int = 0,
                device: str = "cuda", dtype=torch.bfloat16):
    """Time-axis scan inputs as the model lays them out: x, B, C views of one (2, seqs, length, c) conv output,
    dt float32 (2·seqs, length, heads), A/D (2, heads)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    e = heads * headdim
    c = e + 2 * d_state
    xbc = F.silu(torch.randn(2, seqs, length, c, generator=gen)).to(device, dtype)
    x, B, C = xbc.view(2 * seqs, length, c).split([e, d_state, d_state], dim=-1)
    dt = F.softplus(torch.randn(2 * seqs, length, heads, generator=gen) - 1.0).to(device)
    A = -torch.exp(torch.rand(2, heads, generator=gen) * 2.0).to(device)
    D = torch.randn(2, heads, generator=gen).to(device)
    return x.unflatten(-1, (heads, headdim)), dt, A, B.unflatten(-1, (1, d_state)), C.unflatten(-1, (1, d_state)), D


def band_inputs(seqs: int, length: int = 62, heads: int = 16, headdim: int = 64, d_state: int = 128,
                conv_width: int = 4, seed: int = 0, device: str = "cuda", dtype=torch.bfloat16):
    """Band-axis (one-chunk) scan inputs with every fused option, as the fused block lays them out: x, z, B, C and
    raw dt are views of one (2, seqs·length, e + c + h) in-projection, with seqs sequences per direction;
    → (x, dt, A, B, C, D) and the options (x_conv, bc_conv, dt_bias, z) for `ssd.ssd_fwd(..., dir_mode=2)`."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    e = heads * headdim
    c = e + 2 * d_state
    zx = (torch.randn(2, seqs * length, e + c + heads, generator=gen) * 0.5).to(device, dtype)
    z, x, B, C, dt = zx.view(2 * seqs, length, -1).split([e, e, d_state, d_state, heads], dim=-1)
    from bsmamba2.kernels.conv import conv_taps_major

    weight = conv_taps_major((torch.randn(2, c, conv_width, generator=gen) * 0.5).to(device))  # as the block keeps it
    bias = (torch.randn(2, c, generator=gen) * 0.1).to(device)
    dt_bias = (torch.randn(2, heads, generator=gen) - 2.0).to(device)
    A = -torch.exp(torch.rand(2, heads, generator=gen) * 2.0).to(device)
    D = torch.randn(2, heads, generator=gen).to(device)
    options = dict(x_conv=(weight, bias), bc_conv=(weight, bias), dt_bias=dt_bias, z=z.unflatten(-1, (heads, headdim)))
    return (x.unflatten(-1, (heads, headdim)), dt, A, B.unflatten(-1, (1, d_state)), C.unflatten(-1, (1, d_state)),
            D, options)


def backward_buffers(x, B, seed: int = 1):
    """(dy, dx, dB, dC) of a backward call on `scan_inputs` as the mixer's backward makes them: dy contiguous (the
    gated norm's gradient, random), dx, dB, dC views of one conv-output gradient (2·seqs, length, c) in x's dtype."""
    s, l, h, p = x.shape
    g, n = B.shape[2:]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dy = torch.randn(s, l, h, p, generator=gen).to(x.device, x.dtype)
    dxbc = torch.empty(s, l, h * p + 2 * g * n, device=x.device, dtype=x.dtype)
    dx, dB, dC = dxbc.split([h * p, g * n, g * n], dim=-1)
    return dy, dx.unflatten(-1, (h, p)), dB.unflatten(-1, (g, n)), dC.unflatten(-1, (g, n))
