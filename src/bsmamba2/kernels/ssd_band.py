"""The band-axis forward scan (sequences of one chunk, L ≤ BLOCK_Q: the 62 bands) as Triton kernels: the quadratic
form only, no state.

Plain twin: `bsmamba2.ssd.ssd_quadratic` (or `ssd_chunked`); dispatcher: `ssd.ssd_fwd`. `band_cb_kernel` writes
C Bᵀ (causal, Q×Q) once per (sequence, group), and one small program per (sequence, head), `band_fwd_kernel`, reads
it, so no program holds B or C. For inference the two kernels can read the in-projection in place (`ssd.ssd_fwd`'s
fused options: conv1d + SiLU of x, B and C, softplus of dt, and the gate y·silu(z) with its per-head Σ², the gated
RMSNorm's statistics). On Hopper GPUs such calls run as one Gluon kernel instead (`ssd_band_sm90`: C Bᵀ kept on
chip).
"""

from __future__ import annotations

import triton
import triton.language as tl

from bsmamba2.kernels.conv import conv_silu_rows, silu
from bsmamba2.kernels.dt import softplus
from bsmamba2.kernels.ssd_common import (LOG2E, chunk_rows, direction, ones_column, sequence_and_head,
                                         split_program_id, tile_mask)


@triton.jit
def _band_rows(s, L, seqs_per_dir, DIR_MODE: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Of a band-axis sequence s (one chunk): its direction d, whether it is scanned from its end, s as int64, the scan
    positions, which are in range, and their memory positions t (L−1−τ when scanned from the end)."""
    d, reverse = direction(s, seqs_per_dir, DIR_MODE)
    offs_q, mq, t = chunk_rows(0, L, reverse, BLOCK_Q)
    return d, reverse, s.to(tl.int64), offs_q, mq, t


@triton.jit
def _intra_chunk(M, x, dt, Dh, offs_q, HAS_D: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """y = M v + D x with v = x · dt, in the band-axis kernel, for the decayed C·Bᵀ tile M (Q, Q) and x (Q, P)
    float32. In bf16 and float32 the skip term rides on M's diagonal, D x = (D / dt) v, so the product gives y
    whole: an accumulator started from D x needs x in the product's layout, one conversion through shared memory
    per tile. dt is clamped at 1e-30 there so that D / dt stays finite where a step underflows. float16's range
    cannot hold D / dt for small steps, so it starts the accumulator from D x. The time-axis kernel keeps that
    start too: there the fold made the compiler restage x and the chunk loop slower."""
    if HAS_D and DOT != tl.float16:
        dtc = tl.maximum(dt, 1e-30)
        M = tl.where(offs_q[:, None] == offs_q[None, :], M + (Dh / dtc)[:, None], M)
        y = tl.dot(M.to(DOT), (x * dtc[:, None]).to(DOT), input_precision=PREC)
    elif HAS_D:
        y = tl.dot(M.to(DOT), (x * dt[:, None]).to(DOT), Dh * x, input_precision=PREC)
    else:
        y = tl.dot(M.to(DOT), (x * dt[:, None]).to(DOT), input_precision=PREC)
    return y


@triton.jit
def _fused_head_params(cw_ptr, cb_ptr, dtb_ptr, d, h, nheads, CH, P, offs_p, sw_d, sw_c,
                       CONV_K: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Of head h in direction d, for the fused options: pointers to tap 0 of x's conv weights (BLOCK_P,) and x's
    conv bias (float32), and the dt bias; placeholders (0) for options that are off."""
    if CONV_K > 0:  # x's channels are h·P + p of the conv's CH channels; weights (ndir, CH, CONV_K), strided
        ch = h * P + offs_p
        w_x = cw_ptr + d * sw_d + ch * sw_c
        bias_x = tl.load(cb_ptr + d * CH + ch, mask=offs_p < P, other=0.0).to(tl.float32)
    else:
        w_x = cw_ptr
        bias_x = 0.0
    if SOFTPLUS:
        dtb = tl.load(dtb_ptr + d * nheads + h).to(tl.float32)
    else:
        dtb = 0.0
    return w_x, bias_x, dtb


@triton.jit
def _load_x_dt(x_base, dt_base, tau, t, L, reverse, mq, mqp, offs_p, sx_l, sx_p, sdt_l, P,
               w_x, sw_k, bias_x, dtb, CONV_K: tl.constexpr, SOFTPLUS: tl.constexpr, FAST_SILU: tl.constexpr):
    """x (rows τ, BLOCK_P) and dt (rows τ,) float32 of one head, zero on rows past the end. CONV_K > 0: x is the raw
    in-projection, convolved here (taps τ−CONV_K+1 … τ in scan order) and passed through SiLU. SOFTPLUS: dt is raw,
    the step is softplus(dt + dt bias)."""
    if CONV_K > 0:
        x = conv_silu_rows(x_base, offs_p * sx_p, tau, L, reverse, sx_l, offs_p < P, w_x, sw_k, bias_x, CONV_K,
                           FAST_SILU)
        x = tl.where(mqp, x, 0.0)
    else:
        x = tl.load(x_base + t[:, None] * sx_l + offs_p[None, :] * sx_p, mask=mqp, other=0.0).to(tl.float32)
    dt = tl.load(dt_base + t * sdt_l, mask=mq, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = tl.where(mq, softplus(dt + dtb), 0.0)
    return x, dt


@triton.jit
def _store_y(y, y_base, z_base, ss_base, t, mq, mqp, offs_p, sy_l, sy_p, sz_l, sz_p, sss_l,
             GATE: tl.constexpr, FAST_SILU: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """Store y (rows, BLOCK_P) float32 at memory rows t. GATE: store g = y · silu(z) instead, and each row's Σ g²
    over the head's channels at ss_base (the gated RMSNorm's statistics, summed over heads by the caller). Σ g² is
    a product (`ones_column`): summed on the vector units, g went through shared memory into a layout of its own
    (16 KB per tile), which measured slower. float16 keeps the sum on the vector units: after a product started
    from D x, this one gave non-finite Σ g² (Triton 3.6; once an illegal memory access)."""
    if GATE:
        z = tl.load(z_base + t[:, None] * sz_l + offs_p[None, :] * sz_p, mask=mqp, other=0.0).to(tl.float32)
        y = y * silu(z, FAST_SILU)
        if DOT != tl.float16:
            ss = tl.sum(tl.dot((y * y).to(DOT), ones_column(offs_p, DOT), input_precision=PREC), axis=1)
        else:  # float16 (see `_intra_chunk`): after a product started from D x, this one gave non-finite sums
            ss = tl.sum(y * y, axis=1)
        tl.store(ss_base + t * sss_l, ss, mask=mq)
    tl.store(y_base + t[:, None] * sy_l + offs_p[None, :] * sy_p, y.to(y_base.dtype.element_ty), mask=mqp)


@triton.jit
def band_cb_kernel(
    B_ptr, C_ptr, G_ptr, cw_ptr, cb_ptr,
    L, ngroups, seqs_per_dir, CH, sw_d, sw_c, sw_k,
    sb_s, sb_l, sb_g, sb_n,
    sc_s, sc_l, sc_g, sc_n,
    sg_s, sg_g,
    N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    DIR_MODE: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr, CONV_K: tl.constexpr, FAST_SILU: tl.constexpr,
):
    """C Bᵀ of a band-axis sequence in scan order, zero above the diagonal: G (BLOCK_Q × BLOCK_Q) per (sequence,
    group), computed once for all the group's heads. One program per (sequence, group). CONV_K > 0: B and C are the
    raw in-projection, convolved here and passed through SiLU (weights (ndir, CH, CONV_K), strides sw_*, in Mamba2's
    channel order [x, B, C]: B's channels are the last 2·groups·N but groups·N)."""
    s, g = split_program_id(ngroups)
    d, reverse, s64, offs_q, mq, t = _band_rows(s, L, seqs_per_dir, DIR_MODE, BLOCK_Q)
    offs_n = tl.arange(0, BLOCK_N)
    mqn = tile_mask(mq, offs_n, N, BLOCK_N)
    b_base = B_ptr + s64 * sb_s + g * sb_g
    c_base = C_ptr + s64 * sc_s + g * sc_g
    if CONV_K > 0:
        ch_b = (CH - 2 * ngroups * N) + g * N + offs_n
        ch_c = ch_b + ngroups * N
        mn = offs_n < N
        w_d = cw_ptr + d * sw_d  # direction d's weights
        Bm = conv_silu_rows(b_base, offs_n * sb_n, offs_q, L, reverse, sb_l, mn, w_d + ch_b * sw_c, sw_k,
                            tl.load(cb_ptr + d * CH + ch_b, mask=mn, other=0.0).to(tl.float32), CONV_K, FAST_SILU)
        Cm = conv_silu_rows(c_base, offs_n * sc_n, offs_q, L, reverse, sc_l, mn, w_d + ch_c * sw_c, sw_k,
                            tl.load(cb_ptr + d * CH + ch_c, mask=mn, other=0.0).to(tl.float32), CONV_K, FAST_SILU)
        Bm = tl.where(mqn, Bm, 0.0)
        Cm = tl.where(mqn, Cm, 0.0)
    else:
        Bm = tl.load(b_base + t[:, None] * sb_l + offs_n[None, :] * sb_n, mask=mqn, other=0.0)
        Cm = tl.load(c_base + t[:, None] * sc_l + offs_n[None, :] * sc_n, mask=mqn, other=0.0)
    G = tl.dot(Cm.to(DOT), tl.trans(Bm.to(DOT)), input_precision=PREC)
    G = tl.where(offs_q[:, None] >= offs_q[None, :], G, 0.0)
    tl.store(G_ptr + s64 * sg_s + g * sg_g + offs_q[:, None] * BLOCK_Q + offs_q[None, :], G.to(G_ptr.dtype.element_ty))


@triton.jit
def band_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, G_ptr, D_ptr, y_ptr, cw_ptr, cb_ptr, dtb_ptr, z_ptr, ss_ptr,
    L, nheads, seqs_per_dir, heads_per_group, CH, sw_d, sw_c, sw_k,
    sx_s, sx_l, sx_h, sx_p,
    sdt_s, sdt_l, sdt_h,
    sg_s, sg_g,
    sy_s, sy_l, sy_h, sy_p,
    sz_s, sz_l, sz_h, sz_p,
    sss_s, sss_l, sss_h,
    P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
    DIR_MODE: tl.constexpr, HAS_D: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr,
    HEADS_FIRST: tl.constexpr, CONV_K: tl.constexpr, SOFTPLUS: tl.constexpr, GATE: tl.constexpr,
    FAST_SILU: tl.constexpr,
):
    """One chunk (L ≤ BLOCK_Q): y = (G ∘ decay) v + D x with the causal C Bᵀ tile G from `band_cb_kernel`. One
    small program per (sequence, head); the heads of a sequence are neighbouring programs, so G comes from L2.
    Since G is zero above the diagonal, the decay needs no mask: exp2(min(cum_i − cum_j, 0)) is finite there.
    HEADS_FIRST: grid (heads, sequences); else a flat grid (sequences past the grid's second dimension), whose
    index division measured slower."""
    if HEADS_FIRST:
        s, h = sequence_and_head(True)
    else:
        s, h = split_program_id(nheads)
    d, reverse, s64, offs_q, mq, t = _band_rows(s, L, seqs_per_dir, DIR_MODE, BLOCK_Q)
    offs_p = tl.arange(0, BLOCK_P)
    mqp = tile_mask(mq, offs_p, P, BLOCK_P)
    g = h // heads_per_group
    G = tl.load(G_ptr + s64 * sg_s + g * sg_g + offs_q[:, None] * BLOCK_Q + offs_q[None, :]).to(tl.float32)
    w_x, bias_x, dtb = _fused_head_params(cw_ptr, cb_ptr, dtb_ptr, d, h, nheads, CH, P, offs_p, sw_d, sw_c, CONV_K,
                                          SOFTPLUS)
    x, dt = _load_x_dt(x_ptr + s64 * sx_s + h * sx_h, dt_ptr + s64 * sdt_s + h * sdt_h, offs_q, t, L, reverse, mq,
                       mqp, offs_p, sx_l, sx_p, sdt_l, P, w_x, sw_k, bias_x, dtb, CONV_K, SOFTPLUS, FAST_SILU)
    A = tl.load(A_ptr + d * nheads + h).to(tl.float32) * LOG2E
    acum = tl.cumsum(dt * A, axis=0)  # log2 of the decay from the start
    decay = tl.exp2(tl.minimum(acum[:, None] - acum[None, :], 0.0))
    if HAS_D:
        Dh = tl.load(D_ptr + d * nheads + h).to(tl.float32)
    else:
        Dh = 0.0
    y = _intra_chunk(G * decay, x, dt, Dh, offs_q, HAS_D, DOT, PREC)
    _store_y(y, y_ptr + s64 * sy_s + h * sy_h, z_ptr + s64 * sz_s + h * sz_h, ss_ptr + s64 * sss_s + h * sss_h, t,
             mq, mqp, offs_p, sy_l, sy_p, sz_l, sz_p, sss_l, GATE, FAST_SILU, DOT, PREC)
