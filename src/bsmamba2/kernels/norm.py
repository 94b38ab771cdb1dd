"""The norms of the fast block as Triton kernels (forward, backward): the gated RMSNorm of both directions, written
side by side, and the RMS scale of the pre-norm.

Gated RMSNorm.

Plain twin: `bsmamba2.mamba2.RMSNormGated` (gate before the norm), per direction d and group of channels:

    g = y · silu(z),   out[..., d·e + k] = g_k · rsqrt(mean_group(g²) + eps) · w[d, k]

y `(2, s, l, e)` is the scan's output, z `(s, l, 2, e)` a view of the in-projection; the output `(s, l, 2e)` is the
concatenation the merged out-projection reads. One program normalizes ROWS rows of one (direction, group), so the
weight gradient is summed in registers and added with one atomic per element and program. float32 arithmetic.

RMS scale. Plain twin: `rms_scale_reference`, the pre-norm `bsmamba2.mamba2.RMSNorm` without its gain (the fast block
folds the gains of both directions into their in-projections):

    out = x · rstd,   rstd = rsqrt(mean(x²) + eps),   dx = rstd · (dout − out · mean(dout · out))

over the last dimension, float32 arithmetic, rows of any length up to 16384.

L2 scale (inference). Plain twin: `bsmamba2.spectral.ScaledL2Norm` (the band-split models' final norm), one pass:

    out = x / max(‖x‖₂, eps) · scale · γ

read once and written once, in the dtype the next product takes (the four elementwise passes and the cast it
replaces wrote float32 three times).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from bsmamba2 import functional


@triton.jit
def _group_setup(w_ptr, E, GS, BLOCK: tl.constexpr):
    """Program ids (row block, direction d), the columns of this (direction, group), their mask and weights."""
    cols = tl.program_id(1) * GS + tl.arange(0, BLOCK)
    mc = tl.arange(0, BLOCK) < GS
    d = tl.program_id(2)
    w = tl.load(w_ptr + d * E + cols, mask=mc, other=0.0).to(tl.float32)
    return tl.program_id(0), d, cols, mc, w


@triton.jit
def _load_yz(y_ptr, z_ptr, d, r64, cols, mc, sy_d, sy_r, sz_r, sz_d):
    """Row r64 of direction d: the scan output y and the gate z, in float32."""
    y = tl.load(y_ptr + d * sy_d + r64 * sy_r + cols, mask=mc, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + r64 * sz_r + d * sz_d + cols, mask=mc, other=0.0).to(tl.float32)
    return y, z


@triton.jit
def _gated_norm_fwd_kernel(
    y_ptr, z_ptr, w_ptr, out_ptr, R, E, GS, eps,
    sy_d, sy_r, sz_r, sz_d, so_r,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid, d, cols, mc, w = _group_setup(w_ptr, E, GS, BLOCK)
    for i in range(0, ROWS):
        r = pid * ROWS + i
        if r < R:
            r64 = r.to(tl.int64)
            y, z = _load_yz(y_ptr, z_ptr, d, r64, cols, mc, sy_d, sy_r, sz_r, sz_d)
            g = y * z * tl.sigmoid(z)
            rstd = tl.rsqrt(tl.sum(g * g, axis=0) / GS + eps)
            tl.store(out_ptr + r64 * so_r + d * E + cols, (g * rstd * w).to(out_ptr.dtype.element_ty), mask=mc)


@triton.jit
def _gated_norm_bwd_kernel(
    y_ptr, z_ptr, w_ptr, dout_ptr, dy_ptr, dz_ptr, dw_ptr, out_ptr, R, E, GS, eps,
    sy_d, sy_r, sz_r, sz_d, so_r, sdz_r, sdz_d,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, WRITE_OUT: tl.constexpr,
):
    """The gradients; WRITE_OUT: also the forward's output (out_ptr, laid out as dout), computed as the forward
    kernel computes it (the same operations in the same order, so the same values)."""
    pid, d, cols, mc, w = _group_setup(w_ptr, E, GS, BLOCK)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, ROWS):
        r = pid * ROWS + i
        if r < R:
            r64 = r.to(tl.int64)
            y, z = _load_yz(y_ptr, z_ptr, d, r64, cols, mc, sy_d, sy_r, sz_r, sz_d)
            dout = tl.load(dout_ptr + r64 * so_r + d * E + cols, mask=mc, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            silu = z * sig
            g = y * z * sig
            rstd = tl.rsqrt(tl.sum(g * g, axis=0) / GS + eps)
            n = g * rstd
            if WRITE_OUT:
                tl.store(out_ptr + r64 * so_r + d * E + cols, (n * w).to(out_ptr.dtype.element_ty), mask=mc)
            dw += dout * n
            dn = dout * w
            dg = rstd * (dn - n * (tl.sum(dn * n, axis=0) / GS))
            tl.store(dy_ptr + d * sy_d + r64 * sy_r + cols, (dg * silu).to(dy_ptr.dtype.element_ty), mask=mc)
            dz = dg * y * sig * (1 + z * (1 - sig))
            tl.store(dz_ptr + r64 * sdz_r + d * sdz_d + cols, dz.to(dz_ptr.dtype.element_ty), mask=mc)
    tl.atomic_add(dw_ptr + d * E + cols, dw, mask=mc)


_ROWS = 16


def _prepare(y: Tensor, z: Tensor, group_size: int):
    two, s, l, e = y.shape
    if two != 2 or z.shape != (s, l, 2, e) or e % group_size:
        raise ValueError(f"gated norm shapes disagree: y {tuple(y.shape)}, z {tuple(z.shape)}, group {group_size}")
    y2 = y.reshape(2, s * l, e)
    z2 = z.reshape(s * l, 2, e)  # a view for the in-projection's layout
    if y2.stride(-1) != 1 or z2.stride(-1) != 1:
        y2, z2 = y2.contiguous(), z2.contiguous()
    rows = s * l
    grid = (triton.cdiv(rows, _ROWS), e // group_size, 2)
    return y2, z2, rows, grid


def gated_norm_fwd(y: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int) -> Tensor:
    """y (2, s, l, e), z (s, l, 2, e), weight (2, e) → (s, l, 2e) in y's dtype."""
    _, s, l, e = y.shape
    y2, z2, rows, grid = _prepare(y, z, group_size)
    out = torch.empty(s, l, 2 * e, device=y.device, dtype=y.dtype)
    if rows:
        _gated_norm_fwd_kernel[grid](y2, z2, weight.contiguous(), out, rows, e, group_size, eps,
                                     y2.stride(0), y2.stride(1), z2.stride(0), z2.stride(1), 2 * e,
                                     ROWS=_ROWS, BLOCK=triton.next_power_of_2(group_size), num_warps=4)
    return out


def gated_norm_bwd(dout: Tensor, y: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int,
                   dz: Tensor | None = None, out: Tensor | None = None):
    """Gradients (dy (2, s, l, e), dz (s, l, 2, e), dweight (2, e) float32).

    `dz`, if given, is where z's gradient is written: an (s, l, 2, e) tensor with unit stride along e whose rows
    flatten to one stride (e.g. a slice of the in-projection's gradient). `out`, if given (s, l, 2e), receives the
    forward's output, equal to `gated_norm_fwd`'s, from the same pass (for a caller that recomputes it in
    backward)."""
    _, s, l, e = y.shape
    y2, z2, rows, grid = _prepare(y, z, group_size)
    dout = dout.contiguous()
    dy = torch.empty(2, s, l, e, device=y.device, dtype=y.dtype)
    if dz is None:
        dz = torch.empty(s, l, 2, e, device=y.device, dtype=z.dtype)
    if dz.shape != (s, l, 2, e) or dz.stride(-1) != 1:
        raise ValueError(f"dz must be ({s}, {l}, 2, {e}) with unit stride along the last dimension")
    dz2 = dz.view(s * l, 2, e)  # rows (s, l) must flatten to one stride: true of slices of the last dimension
    if out is not None and (out.shape != (s, l, 2 * e) or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous ({s}, {l}, {2 * e}) tensor")
    dw = torch.zeros(2, e, device=y.device, dtype=torch.float32)
    if rows:  # without `out`, dout stands in for its pointer: WRITE_OUT=False never stores through it
        _gated_norm_bwd_kernel[grid](y2, z2, weight.contiguous(), dout, dy, dz2, dw, dout if out is None else out,
                                     rows, e, group_size, eps,
                                     y2.stride(0), y2.stride(1), z2.stride(0), z2.stride(1), 2 * e,
                                     dz2.stride(0), dz2.stride(1), ROWS=_ROWS,
                                     BLOCK=triton.next_power_of_2(group_size), WRITE_OUT=out is not None,
                                     num_warps=4)
    return dy, dz, dw


class GatedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, z, weight, eps, group_size):
        ctx.save_for_backward(y, z, weight)
        ctx.eps, ctx.group_size = eps, group_size
        return gated_norm_fwd(y, z, weight, eps, group_size)

    @staticmethod
    def backward(ctx, dout):
        y, z, weight = ctx.saved_tensors
        dy, dz, dw = gated_norm_bwd(dout, y, z, weight, ctx.eps, ctx.group_size)
        return dy, dz, dw.to(weight.dtype), None, None


def gated_norm_bidirectional(y: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int) -> Tensor:
    """Gated RMSNorm of both directions side by side: y (2, s, l, e), z (s, l, 2, e), weight (2, e) → (s, l, 2e)."""
    return GatedNorm.apply(y, z, weight, eps, group_size)


@triton.jit
def _row_tile(R, N, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's ROWS rows of an (R, N) row-major tensor: row indices, the tile's mask and element offsets."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < R)[:, None] & (cols < N)[None, :]
    return rows, mask, rows.to(tl.int64)[:, None] * N + cols[None, :]


@triton.jit
def rms_rstd(x, N, eps):
    """rsqrt(mean(x²) + eps) of each row of a float32 (rows, BLOCK) tile whose first N columns are the row (the rest
    zero): (rows,)."""
    return tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)


@triton.jit
def _rms_fwd_kernel(x_ptr, out_ptr, rstd_ptr, R, N, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """A (ROWS × N) tile of x (R, N) per program: out = x · rstd, rstd (R,) float32 kept for the backward."""
    rows, mask, offs = _row_tile(R, N, ROWS, BLOCK)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = rms_rstd(x, N, eps)  # (ROWS,)
    tl.store(rstd_ptr + rows, rstd, mask=rows < R)
    tl.store(out_ptr + offs, (x * rstd[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_bwd_kernel(x_ptr, rstd_ptr, dout_ptr, dx_ptr, R, N, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """dx = rstd · (dout − n · mean(dout · n)), n = x · rstd, on a (ROWS × N) tile."""
    rows, mask, offs = _row_tile(R, N, ROWS, BLOCK)
    rstd = tl.load(rstd_ptr + rows, mask=rows < R, other=0.0)[:, None]
    n = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * rstd
    dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dx = rstd * (dout - n * (tl.sum(dout * n, axis=1) / N)[:, None])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _l2_scale_kernel(x_ptr, g_ptr, out_ptr, R, G, N, W, sx_m, sx_g, sg_g, scale, eps,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr, ONES: tl.constexpr):
    """ROWS rows r = i·G + j of x (M, G, N) (strides sx_m, sx_g, 1) per program: out[r, :N] = x[i, j] / max(‖x‖₂,
    eps) · scale · γ[j] (γ (G, N), stride sg_g; 0 when shared), out (R, W) row-major; ONES: out[r, N] = 1 and
    out[r, N+1:W] = 0 (a bias column for the next product), else W = N."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mr = rows < R
    r64 = rows.to(tl.int64)
    i, j = r64 // G, r64 % G
    mx = mr[:, None] & (cols < N)[None, :]
    x = tl.load(x_ptr + (i * sx_m + j * sx_g)[:, None] + cols[None, :], mask=mx, other=0.0).to(tl.float32)
    gamma = tl.load(g_ptr + (j * sg_g)[:, None] + cols[None, :], mask=mx, other=0.0).to(tl.float32)
    inv = scale / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), eps)  # (ROWS,)
    out = x * inv[:, None] * gamma
    if ONES:
        out = tl.where((cols == N)[None, :], 1.0, out)
    tl.store(out_ptr + r64[:, None] * W + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mr[:, None] & (cols < W)[None, :])


def l2_scale(x: Tensor, gamma: Tensor, scale: float, eps: float, dtype: torch.dtype, ones: bool = False) -> Tensor:
    """x / max(‖x‖₂, eps) · scale · γ over the last dimension (float32 arithmetic), in `dtype`; no autograd.

    x (..., n) → (..., n) with γ (n,); or x (m, g, n) with any strides but unit stride along n, γ (g, n) (one gain
    per band) → (m, g, n). ones: (m, g, w) instead, w = n + 1 rounded up to a multiple of 8, with a column of ones
    after the n values, then zeros: the input of a product whose weight carries its bias as one more column."""
    if gamma.dim() == 2:
        if x.dim() != 3 or x.shape[1:] != gamma.shape or x.stride(-1) != 1:
            raise ValueError(f"l2_scale with per-group gains takes x (m, g, n) with γ (g, n), got x "
                             f"{tuple(x.shape)}, γ {tuple(gamma.shape)}")
        x3, lead = x, x.shape[:-1]
    else:
        x3 = x.reshape(-1, 1, x.shape[-1])
        if x3.stride(-1) != 1:
            x3 = x3.contiguous()
        lead = x.shape[:-1]
    m, g, n = x3.shape
    gamma = gamma.contiguous()
    w = (n + 8) // 8 * 8 if ones else n
    out = torch.empty(m * g, w, device=x.device, dtype=dtype)
    if m * g:
        meta = _rms_launch(w)
        _l2_scale_kernel[(triton.cdiv(m * g, meta["ROWS"]),)](
            x3, gamma, out, m * g, g, n, w, x3.stride(0), x3.stride(1), gamma.stride(0) if gamma.dim() == 2 else 0,
            scale, eps, **meta, ONES=ones)
    return out.view(*lead, w)


def _rms_launch(n: int) -> dict:
    """Tile of one program: up to 8 rows, at most ~4096 elements."""
    if n > 16384:
        raise ValueError(f"the fast RMS scale takes rows of at most 16384 elements, got {n}; use the 'torch' backend")
    block = triton.next_power_of_2(n)
    rows = max(1, min(8, 4096 // block))
    return dict(ROWS=rows, BLOCK=block, num_warps=min(8, max(1, rows * block // 512)))


def rms_scale_reference(x: Tensor, eps: float) -> Tensor:
    """Plain twin of `rms_scale`: x · rsqrt(mean(x²) + eps) over the last dimension in float32, in x's dtype."""
    return functional.rms_scale(x, eps)


class RMSScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (rows, n)
        rows, n = x2.shape
        out = torch.empty_like(x2)
        rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
        if rows:
            meta = _rms_launch(n)
            _rms_fwd_kernel[(triton.cdiv(rows, meta["ROWS"]),)](x2, out, rstd, rows, n, eps, **meta)
        ctx.save_for_backward(x2, rstd)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dout):
        x2, rstd = ctx.saved_tensors
        rows, n = x2.shape
        dout2 = dout.reshape(rows, n).contiguous()
        dx = torch.empty_like(x2)
        if rows:
            meta = _rms_launch(n)
            _rms_bwd_kernel[(triton.cdiv(rows, meta["ROWS"]),)](x2, rstd, dout2, dx, rows, n, **meta)
        return dx.view(dout.shape), None


def rms_scale(x: Tensor, eps: float) -> Tensor:
    """x · rsqrt(mean(x²) + eps) over the last dimension (float32 arithmetic), in x's dtype; x (..., n)."""
    return RMSScale.apply(x, eps)
