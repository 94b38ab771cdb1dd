"""Depthwise conv1d + SiLU of both directions of a bidirectional Mamba2 block, as Triton kernels (forward, backward).

Plain twin: `Mamba2.forward`'s `F.silu(conv1d(xBC)[..., :l])` on the sequence (direction 0) and on the flipped
sequence, flipped back (direction 1). Without flips, direction 1 is the anti-causal conv with reversed taps:

    out[0, t] = silu(b₀ + Σ_i w₀[i] · raw[t − (k−1) + i, 0])      taps t−k+1 … t   (zeros before the start)
    out[1, t] = silu(b₁ + Σ_i w₁[i] · raw[t + (k−1) − i, 1])        taps t … t+k−1   (zeros after the end)

`raw` is read in place from the in-projection `(s, l, 2, c)` (any strides); the output is `(2, s, l, c)`, the layout
the scan reads as `(2s, l, ·)`. Backward recomputes the pre-activations (no extra saved tensor) and accumulates the
weight and bias gradients per program in float32, then with atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _conv_fwd_kernel(
    raw_ptr, w_ptr, b_ptr, out_ptr, S, L, CH,
    sr_s, sr_l, sr_d, sr_c,
    so_d, so_s, so_l, so_c,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_sd = tl.program_id(2)
    d = pid_sd // S
    s = pid_sd % S
    sign = 1 - 2 * d  # +1: causal taps, −1: anti-causal taps
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < CH
    base = raw_ptr + s.to(tl.int64) * sr_s + d * sr_d
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32) + tl.load(b_ptr + d * CH + offs_c, mask=mc, other=0.0)[None, :]
    for i in tl.static_range(K):
        src = offs_t + sign * (i - (K - 1))
        m = (src >= 0) & (src < L)
        wi = tl.load(w_ptr + (d * CH + offs_c) * K + i, mask=mc, other=0.0).to(tl.float32)
        xv = tl.load(base + src[:, None] * sr_l + offs_c[None, :] * sr_c, mask=m[:, None] & mc[None, :], other=0.0)
        acc += xv.to(tl.float32) * wi[None, :]
    out = acc * tl.sigmoid(acc)
    optr = out_ptr + d * so_d + s.to(tl.int64) * so_s + offs_t[:, None] * so_l + offs_c[None, :] * so_c
    tl.store(optr, out.to(out_ptr.dtype.element_ty), mask=(offs_t < L)[:, None] & mc[None, :])


@triton.jit
def _conv_bwd_kernel(
    raw_ptr, w_ptr, b_ptr, dout_ptr, draw_ptr, dw_ptr, db_ptr, S, L, CH,
    sr_s, sr_l, sr_d, sr_c,
    so_d, so_s, so_l, so_c,
    sdr_s, sdr_l, sdr_d, sdr_c,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, SEQS: tl.constexpr,
):
    """One program: a (positions × channels) tile of SEQS sequences of one direction; the weight and bias gradients
    are summed over them in registers and added with one atomic per element and program."""
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_sd = tl.program_id(2)
    n_sblocks = tl.cdiv(S, SEQS)
    d = pid_sd // n_sblocks
    s0 = (pid_sd % n_sblocks) * SEQS
    sign = 1 - 2 * d
    offs_u = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # positions of raw whose gradient this program writes
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < CH
    bias = tl.load(b_ptr + d * CH + offs_c, mask=mc, other=0.0).to(tl.float32)
    dw0 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dw1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dw2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dw3 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for si in range(0, SEQS):
        s = s0 + si
        mu = (offs_u < L) & ((tl.zeros((BLOCK_T,), dtype=tl.int32) + s) < S)
        base = raw_ptr + s.to(tl.int64) * sr_s + d * sr_d
        dbase = dout_ptr + d * so_d + s.to(tl.int64) * so_s
        raw_u = tl.load(base + offs_u[:, None] * sr_l + offs_c[None, :] * sr_c, mask=mu[:, None] & mc[None, :],
                        other=0.0).to(tl.float32)
        draw = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for i in tl.static_range(K):
            # raw[u] enters out[t] through tap i, with t = u − sign·(i − (K−1))
            t = offs_u - sign * (i - (K - 1))
            mt = (t >= 0) & (t < L) & mu
            pre = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32) + bias[None, :]
            for j in tl.static_range(K):
                src = t + sign * (j - (K - 1))
                m = (src >= 0) & (src < L) & mt
                wj = tl.load(w_ptr + (d * CH + offs_c) * K + j, mask=mc, other=0.0).to(tl.float32)
                xv = tl.load(base + src[:, None] * sr_l + offs_c[None, :] * sr_c, mask=m[:, None] & mc[None, :],
                             other=0.0)
                pre += xv.to(tl.float32) * wj[None, :]
            dout = tl.load(dbase + t[:, None] * so_l + offs_c[None, :] * so_c, mask=mt[:, None] & mc[None, :],
                           other=0.0).to(tl.float32)
            sig = tl.sigmoid(pre)
            dpre = dout * sig * (1 + pre * (1 - sig))  # d silu(pre) / d pre
            wi = tl.load(w_ptr + (d * CH + offs_c) * K + i, mask=mc, other=0.0).to(tl.float32)
            draw += dpre * wi[None, :]
            dwi = tl.sum(dpre * raw_u, axis=0)
            if i == 0:
                dw0 += dwi
            elif i == 1:
                dw1 += dwi
            elif i == 2:
                dw2 += dwi
            else:
                dw3 += dwi
            if i == K - 1:  # tap K−1 is offset 0 in both directions: t = u, each position once
                dbias += tl.sum(dpre, axis=0)
        dptr = draw_ptr + s.to(tl.int64) * sdr_s + d * sdr_d + offs_u[:, None] * sdr_l + offs_c[None, :] * sdr_c
        tl.store(dptr, draw.to(draw_ptr.dtype.element_ty), mask=mu[:, None] & mc[None, :])
    tl.atomic_add(dw_ptr + (d * CH + offs_c) * K + 0, dw0, mask=mc)
    if K > 1:
        tl.atomic_add(dw_ptr + (d * CH + offs_c) * K + 1, dw1, mask=mc)
    if K > 2:
        tl.atomic_add(dw_ptr + (d * CH + offs_c) * K + 2, dw2, mask=mc)
    if K > 3:
        tl.atomic_add(dw_ptr + (d * CH + offs_c) * K + 3, dw3, mask=mc)
    tl.atomic_add(db_ptr + d * CH + offs_c, dbias, mask=mc)


_BLOCK_T, _BLOCK_C = 32, 128
_SEQS_PER_PROGRAM = 8  # backward: sequences whose weight gradients one program sums before its atomics


def _grid(s: int, l: int, c: int) -> tuple[int, int, int]:
    return (triton.cdiv(l, _BLOCK_T), triton.cdiv(c, _BLOCK_C), 2 * s)


def conv_silu_fwd(raw: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """raw (s, l, 2, c), weight (2, c, k), bias (2, c) → (2, s, l, c) in raw's dtype."""
    s, l, two, c = raw.shape
    if two != 2 or weight.shape[:2] != (2, c) or bias.shape != (2, c):
        raise ValueError(f"conv shapes disagree: raw {tuple(raw.shape)}, weight {tuple(weight.shape)}, "
                         f"bias {tuple(bias.shape)}")
    out = torch.empty(2, s, l, c, device=raw.device, dtype=raw.dtype)
    if s and l:
        _conv_fwd_kernel[_grid(s, l, c)](raw, weight.contiguous(), bias.contiguous(), out, s, l, c,
                                         *raw.stride(), *out.stride(), K=weight.shape[-1], BLOCK_T=_BLOCK_T,
                                         BLOCK_C=_BLOCK_C, num_warps=4)
    return out


def conv_silu_bwd(dout: Tensor, raw: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (draw (s, l, 2, c) in raw's dtype, dweight (2, c, k) and dbias (2, c) in float32)."""
    s, l, _, c = raw.shape
    draw = torch.empty(s, l, 2, c, device=raw.device, dtype=raw.dtype)
    dw = torch.zeros(weight.shape, device=raw.device, dtype=torch.float32)
    db = torch.zeros(bias.shape, device=raw.device, dtype=torch.float32)
    k = weight.shape[-1]
    if not 1 <= k <= 4:
        raise ValueError(f"the fast conv1d supports d_conv 1..4, got {k}; use the 'torch' backend")
    if s and l:
        seqs = _SEQS_PER_PROGRAM
        grid = (triton.cdiv(l, _BLOCK_T), triton.cdiv(c, _BLOCK_C), 2 * triton.cdiv(s, seqs))
        _conv_bwd_kernel[grid](raw, weight.contiguous(), bias.contiguous(), dout, draw, dw, db, s, l, c,
                               *raw.stride(), *dout.stride(), *draw.stride(), K=k,
                               BLOCK_T=_BLOCK_T, BLOCK_C=_BLOCK_C, SEQS=seqs, num_warps=4)
    return draw, dw, db


class ConvSiLU(torch.autograd.Function):
    """Autograd wrapper of the two-direction depthwise conv1d + SiLU."""

    @staticmethod
    def forward(ctx, raw, weight, bias):
        ctx.save_for_backward(raw, weight, bias)
        return conv_silu_fwd(raw, weight, bias)

    @staticmethod
    def backward(ctx, dout):
        raw, weight, bias = ctx.saved_tensors
        draw, dw, db = conv_silu_bwd(dout, raw, weight, bias)
        return draw, dw.to(weight.dtype), db.to(bias.dtype)


def conv_silu_bidirectional(raw: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Depthwise conv1d + SiLU, direction 0 causal and direction 1 anti-causal. raw (s, l, 2, c) (any strides),
    weight (2, c, k), bias (2, c) → (2, s, l, c)."""
    return ConvSiLU.apply(raw, weight, bias)
