"""The scan's step sizes dt = softplus(dt_raw + dt_bias) for both directions, as one Triton pass.

Plain twin: `softplus_dt_reference` (`F.softplus`, threshold 20, in float32), the same as `Mamba2.forward`'s dt.
dt_raw is read in place from the in-projection `(s, l, 2, h)`; the output is float32 `(2, s, l, h)`, the layout the
scan reads as `(2s, l, h)`. In PyTorch this takes four passes (cast, add, softplus, transpose), each a kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def softplus(u):
    """softplus(u) = max(u, 0) + log1p(exp(−|u|)) in float32; log1p(e) as log(w) − (w − 1 − e)/w with w = 1 + e,
    which keeps the digits of small e that log(1 + e) loses (F.softplus's threshold 20 changes nothing in float32)."""
    e = tl.exp(-tl.abs(u))
    w = 1.0 + e
    return tl.maximum(u, 0.0) + tl.log(w) - ((w - 1.0) - e) / w


@triton.jit
def _softplus_dt_kernel(raw_ptr, bias_ptr, out_ptr, R, L, H, sr_s, sr_l, sr_d,
                        ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    """ROWS rows r = s·L + l of direction d (program axis 1): out[d, r, :] = softplus(raw[s, l, d, :] + bias[d])."""
    d = tl.program_id(1)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows < R)[:, None] & (cols < H)[None, :]
    r64 = rows.to(tl.int64)
    src = (r64 // L) * sr_s + (r64 % L) * sr_l + d * sr_d
    u = tl.load(raw_ptr + src[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u += tl.load(bias_ptr + d * H + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
    dst = (d * R + r64)[:, None] * H + cols[None, :]
    tl.store(out_ptr + dst, softplus(u), mask=mask)


def softplus_dt(dt_raw: Tensor, dt_bias: Tensor) -> Tensor:
    """dt_raw (s, l, 2, h) (any strides, unit stride along h), dt_bias (2, h) → float32 (2, s, l, h)."""
    s, l, two, h = dt_raw.shape
    if two != 2 or dt_bias.shape != (2, h):
        raise ValueError(f"softplus_dt shapes disagree: dt_raw {tuple(dt_raw.shape)}, dt_bias {tuple(dt_bias.shape)}")
    if dt_raw.stride(-1) != 1:
        dt_raw = dt_raw.contiguous()
    out = torch.empty(2, s, l, h, device=dt_raw.device, dtype=torch.float32)
    rows = s * l
    if rows:
        block = triton.next_power_of_2(h)
        per = max(1, min(64, 2048 // block))
        _softplus_dt_kernel[(triton.cdiv(rows, per), 2)](dt_raw, dt_bias.contiguous(), out, rows, l, h,
                                                         *dt_raw.stride()[:3], ROWS=per, BLOCK_H=block,
                                                         num_warps=4)
    return out


def softplus_dt_reference(dt_raw: Tensor, dt_bias: Tensor) -> Tensor:
    """Plain twin of `softplus_dt`."""
    return F.softplus(dt_raw.float() + dt_bias.float()).permute(2, 0, 1, 3).contiguous()
