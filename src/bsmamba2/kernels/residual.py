"""The residual add of a block, written straight into the next pass's layout (Triton).

Plain twin: `torch.add(a.view(out.shape), b.view(out.shape), out=out)`. Between the time and band passes the latent
changes layout, `(b, k, t, d)` ↔ `(b, t, k, d)`, a permutation of whole rows of d contiguous values. PyTorch's
strided elementwise add writes such an `out` at about half the speed of a contiguous add; here every program
copies ROWS whole rows, each read and written as one contiguous run, and only the row's destination moves.

`gated_merge_into` is the same add for the fused inference block, with the gated RMSNorm's row scale applied on the
way (twin: `gated_merge_reference`): the out-projections were applied to the un-normalized gated outputs, and a row
scale commutes with a matrix product, so out = rstd₀·P₀ + rstd₁·P₁ + m + x, rstd_d = rsqrt(Σ_h ss_d / e + eps).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from bsmamba2 import functional
from bsmamba2.kernels.norm import rms_rstd


@triton.jit
def _add_rows_kernel(a_ptr, b_ptr, out_ptr, R, N, N1, N2, so0, so1, so2,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Rows r of a, b (R, N) contiguous: out[i0, i1, i2, :] = a[r] + b[r] with r = (i0·N1 + i1)·N2 + i2."""
    r64, mask, src, dst = _rows(R, N, N1, N2, so0, so1, so2, ROWS, BLOCK)
    total = tl.load(a_ptr + src, mask=mask, other=0.0).to(tl.float32) + tl.load(b_ptr + src, mask=mask,
                                                                                 other=0.0).to(tl.float32)
    tl.store(out_ptr + dst, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rows(R, N, N1, N2, so0, so1, so2, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's ROWS rows r of (R, N): r as int64, the tile's mask, offsets in a contiguous (R, N) source
    and in `out`, whose row r is out[i0, i1, i2] with r = (i0·N1 + i1)·N2 + i2."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < R)[:, None] & (cols < N)[None, :]
    r64 = rows.to(tl.int64)
    i2 = r64 % N2
    i1 = (r64 // N2) % N1
    i0 = r64 // (N2 * N1)
    return r64, mask, r64[:, None] * N + cols[None, :], (i0 * so0 + i1 * so1 + i2 * so2)[:, None] + cols[None, :]


@triton.jit
def _rstd(ss_ptr, r64, R, H, inv_e, eps, BLOCK_H: tl.constexpr):
    """rsqrt(Σ_h ss[r, h] · inv_e + eps) of rows r64 of ss (R, H) float32; (ROWS,)."""
    hs = tl.arange(0, BLOCK_H)
    ss = tl.load(ss_ptr + r64[:, None] * H + hs[None, :], mask=(r64 < R)[:, None] & (hs < H)[None, :], other=0.0)
    return tl.rsqrt(tl.sum(ss, axis=1) * inv_e + eps)


@triton.jit
def _gated_merge_kernel(p_ptr, ss_ptr, m_ptr, x_ptr, out_ptr, xn_ptr, R, N, H, inv_e, eps, eps_next,
                        N1, N2, so0, so1, so2,
                        ROWS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_H: tl.constexpr, SCALED: tl.constexpr):
    """out[row r] = rstd₀[r]·P[0, r] + rstd₁[r]·P[1, r] + m[r] + x[r]; P (2, R, N), ss (2, R, H), m and x (R, N).
    SCALED: also xn[r] = o · rsqrt(mean(o²) + eps_next) of the rounded output o, at out's offsets in xn."""
    r64, mask, src, dst = _rows(R, N, N1, N2, so0, so1, so2, ROWS, BLOCK)
    rstd0 = _rstd(ss_ptr, r64, R, H, inv_e, eps, BLOCK_H)
    rstd1 = _rstd(ss_ptr + R * H, r64, R, H, inv_e, eps, BLOCK_H)
    total = tl.load(m_ptr + src, mask=mask, other=0.0).to(tl.float32)
    total += tl.load(x_ptr + src, mask=mask, other=0.0).to(tl.float32)
    total += rstd0[:, None] * tl.load(p_ptr + src, mask=mask, other=0.0).to(tl.float32)
    total += rstd1[:, None] * tl.load(p_ptr + R * N + src, mask=mask, other=0.0).to(tl.float32)
    o = total.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + dst, o, mask=mask)
    if SCALED:
        of = o.to(tl.float32)
        tl.store(xn_ptr + dst, (of * rms_rstd(of, N, eps_next)[:, None]).to(xn_ptr.dtype.element_ty), mask=mask)


def _out_rows(a: Tensor, out: Tensor, what: str):
    """out as 4-D (n0, n1, l, n), its rows' index sizes and strides, the rows and the launch's tile."""
    if out.dim() > 4 or out.stride(-1) != 1 or out.shape[-2:] != a.shape[1:] or out.numel() != a.numel():
        raise ValueError(f"{what} shapes disagree: a {tuple(a.shape)}, out {tuple(out.shape)}")
    out4 = out.view((1,) * (4 - out.dim()) + tuple(out.shape))  # (n0, n1, l, n)
    _, n1, l, n = out4.shape
    block = triton.next_power_of_2(n)
    return out4, (n1, l, *out4.stride()[:3]), a.numel() // n, dict(ROWS=max(1, min(16, 4096 // block)), BLOCK=block)


def add_into(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """out = a + b, with a and b `(s, l, n)` and `out` `(*lead, l, n)` (at most two leading dims, any strides
    but unit stride along n): the sum of a's rows in order, written to out's rows. float32 arithmetic."""
    if a.shape != b.shape:
        raise ValueError(f"add_into shapes disagree: a {tuple(a.shape)}, b {tuple(b.shape)}")
    out4, where, rows, tile = _out_rows(a, out, "add_into")
    if rows:
        _add_rows_kernel[(triton.cdiv(rows, tile["ROWS"]),)](a.contiguous(), b.contiguous(), out4, rows,
                                                             a.shape[-1], *where, **tile, num_warps=4)
    return out


def gated_merge_into(parts: Tensor, ss: Tensor, merged: Tensor, x: Tensor, e: int, eps: float,
                     out: Tensor | None = None, scaled: tuple[Tensor, float] | None = None) -> Tensor:
    """out = rstd₀·parts[0] + rstd₁·parts[1] + merged + x (float32 arithmetic), rstd_d = rsqrt(Σ_h ss[d] / e + eps).

    parts (2, s·l, n), ss (2, s·l, h) float32, merged and x (s, l, n); out as in `add_into`, or a new (s, l, n) in
    x's dtype. scaled = (xn, eps'): xn, shaped and strided like out, also receives rms_scale(out, eps'), the next
    block's pre-norm, written from the rows in registers so that block need not read out again."""
    s, l, n = x.shape
    if parts.shape != (2, s * l, n) or ss.shape[:2] != (2, s * l) or merged.shape != x.shape:
        raise ValueError(f"gated_merge_into shapes disagree: parts {tuple(parts.shape)}, ss {tuple(ss.shape)}, "
                         f"merged {tuple(merged.shape)}, x {tuple(x.shape)}")
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    out4, where, rows, tile = _out_rows(x, out, "gated_merge_into")
    xn, eps_next = scaled if scaled is not None else (out, 0.0)
    if xn.shape != out.shape or xn.stride() != out.stride():
        raise ValueError(f"the scaled output must be shaped and strided like out {tuple(out.shape)} "
                         f"{out.stride()}, got {tuple(xn.shape)} {xn.stride()}")
    h = ss.shape[-1]
    if rows:
        _gated_merge_kernel[(triton.cdiv(rows, tile["ROWS"]),)](
            parts.contiguous(), ss.contiguous(), merged.contiguous(), x.contiguous(), out4, xn.view(out4.shape),
            rows, n, h, 1.0 / e, eps, eps_next, *where, **tile, BLOCK_H=triton.next_power_of_2(h),
            SCALED=scaled is not None, num_warps=4)
    return out


def gated_merge_reference(parts: Tensor, ss: Tensor, merged: Tensor, x: Tensor, e: int, eps: float,
                          scaled_eps: float | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Plain twin of `gated_merge_into` (new output); with scaled_eps, (out, its rms scale) as the kernel writes
    them."""
    rstd = torch.rsqrt(ss.float().sum(-1, keepdim=True) / e + eps)  # (2, s·l, 1)
    total = (rstd * parts.float()).sum(0).view(x.shape) + merged.float() + x.float()
    out = total.to(x.dtype)
    return out if scaled_eps is None else (out, functional.rms_scale(out, scaled_eps))
