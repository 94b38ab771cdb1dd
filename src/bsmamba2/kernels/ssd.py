"""SSD scan (the Mamba2 recurrence) as Triton kernels: forward and backward, chunked, states kept on chip.

The plain-PyTorch twin is `bsmamba2.ssd.ssd_chunked` (and `ssd_sequential`, the ground truth). Per head h, with
a_t = dt_t·A_h, cum_t = Σ_{k≤t} a_k and v_t = dt_t·x_t, the scan computes

    y_i = Σ_{j≤i} exp(cum_i − cum_j) (C_i·B_j) v_j + D_h x_i

Long sequences (the time axis, 801 frames; `_ssd_fwd_kernel`): one program owns one (sequence, head) and walks the
sequence in chunks of BLOCK_Q steps, carrying the state (headdim × d_state, float32) in registers, so no state goes
to memory in the forward pass:

    intra-chunk   y  = (C Bᵀ ∘ decay) v                        the masked (attention-like) form, (Q×Q) tile
    inter-chunk   y += exp(acum) · C Sᵀ                        S: the state entering the chunk
    state         S  = exp(Σa) S + (v · exp(Σa − acum))ᵀ B

On Hopper GPUs `ssd_fwd` runs this forward as the Gluon kernel of `ssd_sm90` instead (same function, explicit
buffers and asynchronous tensor-core products; BSMAMBA2_SSD_GLUON=0 keeps this one).

Short sequences (L ≤ BLOCK_Q: the band axis, 62 bands; `_ssd_fwd_short_kernel`): one chunk, the quadratic form
only, no state. `_cb_short_kernel` writes C Bᵀ (causal, Q×Q) once per (sequence, group), and one small program per
(sequence, head) reads it, so no program holds B or C. For inference the two forward kernels can read the
in-projection in place (`ssd_fwd`'s fused options: conv1d + SiLU of x, B and C, softplus of dt, and the gate
y·silu(z) with its per-head Σ², the gated RMSNorm's statistics). On Hopper GPUs such calls run as one Gluon
kernel instead (`ssd_short_sm90`: C Bᵀ kept on chip; BSMAMBA2_SSD_GLUON_BAND=0 keeps this pair).

Gradients (dy given; M_ij = exp(cum_i − cum_j)(C_i·B_j)(dy_i·v_j) for i ≥ j):
    dC_i = Σ_{j≤i} exp(·)(dy_i·v_j) B_j
    dv_j = Σ_{i≥j} exp(·)(C_i·B_j) dy_i
    dB_j = Σ_{i≥j} exp(·)(dy_i·v_j) C_i
    da_k = Σ_{i ≥ k > j} M_ij                  by pair sets (no C·dC − B·dB cancellation)
    dx = dt·dv + D·dy,  ddt = x·dv + A·da,  dA = Σ da·dt,  dD = Σ dy·x
The only sequential part is the chunk-boundary states: `_ssd_bwd_states_kernel` walks each (sequence, head) once
forward for the states S_c entering each chunk and once backward for their gradients dS_c, one product per chunk,
and stores both. Then `_ssd_bwd_chunk_kernel`, one program per (sequence, head, chunk), computes every gradient of
its chunk from its own tiles and those two states, in parallel over chunks. One-chunk sequences skip the states.
dB and dC go to per-head buffers that are summed over each group's heads afterwards (float32 atomics over 16 heads
were 5× slower).

Directions: DIR_MODE 0 scans every sequence forward, 1 every sequence backward (position t read as L−1−t: the
backward half of a bidirectional block without flip copies), 2 the first `seqs_per_dir` sequences forward and the
rest backward (both directions of a block in one launch). A and D are `(ndir, heads)`.

Decay arithmetic (cumsum, exp) and accumulation are float32; matrix products take the inputs' dtype (bf16 on the
fast path, float32 with IEEE products otherwise). All kernels keep cumulative decays in base 2 (log2(e)
folded into A), so each exponential is a single exp2.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from bsmamba2.kernels.conv import conv_silu_rows, fast_silu, silu
from bsmamba2.kernels.dt import softplus


@triton.jit
def _direction(s, seqs_per_dir, DIR_MODE: tl.constexpr):
    """(direction index d, whether program sequence s is scanned from its end) for DIR_MODE 0, 1 or 2."""
    d = s // seqs_per_dir
    if DIR_MODE == 0:
        reverse = s < 0
    elif DIR_MODE == 1:
        reverse = s >= 0
    else:
        reverse = d == 1
    return d, reverse


@triton.jit
def _sequence_and_head(HEADS_FIRST: tl.constexpr):
    """(sequence, head) of a long-sequence program. HEADS_FIRST: the heads of one sequence are neighbouring programs
    (grid (heads, sequences)), so they run together and share the sequence's B and C tiles through the L2 cache."""
    if HEADS_FIRST:
        return tl.program_id(1), tl.program_id(0)
    return tl.program_id(0), tl.program_id(1)


@triton.jit
def _head_bases(x_ptr, B_ptr, C_ptr, y_ptr, s, h, heads_per_group, sx_s, sx_h, sb_s, sb_g, sc_s, sc_g, sy_s, sy_h):
    """Of the long-sequence forward scan's program (sequence s, head h): the start of its x, B, C (its head's
    group) and y. Scalar arithmetic only, so the Gluon kernel (`ssd_sm90`) calls it too."""
    g = h // heads_per_group
    s64 = s.to(tl.int64)
    return (x_ptr + s64 * sx_s + h * sx_h, B_ptr + s64 * sb_s + g * sb_g, C_ptr + s64 * sc_s + g * sc_g,
            y_ptr + s64 * sy_s + h * sy_h)


@triton.jit
def _split_program_id(n):
    """(program id // n, program id % n) on a flat grid."""
    pid = tl.program_id(0)
    return pid // n, pid % n


@triton.jit
def _chunk_rows(c, L, reverse, BLOCK_Q: tl.constexpr):
    """Of chunk c: the scan positions' offsets in the chunk, which are in range, and their memory positions t."""
    offs_q = tl.arange(0, BLOCK_Q)
    tau = c * BLOCK_Q + offs_q  # position in scan order
    mq = tau < L
    return offs_q, mq, tl.where(reverse, L - 1 - tau, tau)


@triton.jit
def _one_chunk_rows(s, L, seqs_per_dir, DIR_MODE: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Of a one-chunk sequence s: its direction d, whether it is scanned from its end, s as int64, the scan
    positions, which are in range, and their memory positions t (L−1−τ when scanned from the end)."""
    d, reverse = _direction(s, seqs_per_dir, DIR_MODE)
    offs_q, mq, t = _chunk_rows(0, L, reverse, BLOCK_Q)
    return d, reverse, s.to(tl.int64), offs_q, mq, t


LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _tile_mask(rows_ok, offs, SIZE: tl.constexpr, BLOCK: tl.constexpr):
    """Mask of a (rows, BLOCK) tile: the rows in range, and the columns below SIZE only where the tile is wider than
    the data (a compile-time choice: no per-element column test for the model's power-of-two headdim and d_state)."""
    if SIZE == BLOCK:
        return rows_ok[:, None]
    else:
        return rows_ok[:, None] & (offs < SIZE)[None, :]


@triton.jit
def ones_column(offs, DT: tl.constexpr):
    """A (len(offs), 16) tile in DT, ones in column 0 and zeros elsewhere: (g ∘ g) times it has each row's Σ g² in
    column 0. Summing g² as this product keeps every use of g a product operand, so g never needs a layout of its
    own (a conversion through shared memory per tile); `gated_proj` and the one-chunk scan's gate use it."""
    return ((offs[:, None] * 0 + tl.arange(0, 16)[None, :]) == 0).to(DT)


@triton.jit
def _intra_chunk(M, x, dt, Dh, offs_q, HAS_D: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """y = M v + D x with v = x · dt, in the one-chunk kernel, for the decayed C·Bᵀ tile M (Q, Q) and x (Q, P)
    float32. In bf16 and float32 the skip term rides on M's diagonal, D x = (D / dt) v, so the product gives y
    whole: an accumulator started from D x needs x in the product's layout, one conversion through shared memory
    per tile. dt is clamped at 1e-30 there so that D / dt stays finite where a step underflows. float16's range
    cannot hold D / dt for small steps, so it starts the accumulator from D x. The long-sequence kernel keeps that
    start too: there the fold made the compiler restage x and the chunk loop slower (H200: 3.10 → 4.62 ms)."""
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
    (16 KB per tile). With `_intra_chunk`, the fused band scan took 3.03-3.12 ms per call against 3.47-3.56 on an
    H200. float16 keeps the sum on the vector units: after a product started from D x, this one gave non-finite
    Σ g² (Triton 3.6, H200; once an illegal memory access)."""
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
def _ssd_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr,
    L, nheads, seqs_per_dir, heads_per_group,
    sx_s, sx_l, sx_h, sx_p,
    sdt_s, sdt_l, sdt_h,
    sb_s, sb_l, sb_g, sb_n,
    sc_s, sc_l, sc_g, sc_n,
    sy_s, sy_l, sy_h, sy_p,
    P: tl.constexpr, N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    DIR_MODE: tl.constexpr, HAS_D: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr,
    HEADS_FIRST: tl.constexpr,
):
    """Decays in base 2: log2(e) is folded into A once, so each exponential is one exp2 (no multiply per element).
    No fused options here: this loop is latency-bound, and each of them cost more inside it than as its own pass
    (H100, paper size: 3.15 ms per call; +1.5 ms softplus of dt, +1.4 gate, +4.8 conv1d of x)."""
    s, h = _sequence_and_head(HEADS_FIRST)
    d, reverse = _direction(s, seqs_per_dir, DIR_MODE)
    x_base, b_base, c_base, y_base = _head_bases(x_ptr, B_ptr, C_ptr, y_ptr, s, h, heads_per_group, sx_s, sx_h,
                                                 sb_s, sb_g, sc_s, sc_g, sy_s, sy_h)
    dt_base = dt_ptr + s.to(tl.int64) * sdt_s + h * sdt_h

    offs_q = tl.arange(0, BLOCK_Q)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    A = tl.load(A_ptr + d * nheads + h).to(tl.float32) * LOG2E
    if HAS_D:  # loaded once here: inside the loop it would be reloaded after every store (y might alias D)
        Dh = tl.load(D_ptr + d * nheads + h).to(tl.float32)
    else:
        Dh = 0.0
    causal = offs_q[:, None] >= offs_q[None, :]
    state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    n_chunks = tl.cdiv(L, BLOCK_Q)
    for c in range(0, n_chunks):
        offs_q, mq, t = _chunk_rows(c, L, reverse, BLOCK_Q)
        mqp = _tile_mask(mq, offs_p, P, BLOCK_P)
        mqn = _tile_mask(mq, offs_n, N, BLOCK_N)
        x = tl.load(x_base + t[:, None] * sx_l + offs_p[None, :] * sx_p, mask=mqp, other=0.0).to(tl.float32)
        dt = tl.load(dt_base + t * sdt_l, mask=mq, other=0.0).to(tl.float32)
        Bm = tl.load(b_base + t[:, None] * sb_l + offs_n[None, :] * sb_n, mask=mqn, other=0.0).to(DOT)
        Cm = tl.load(c_base + t[:, None] * sc_l + offs_n[None, :] * sc_n, mask=mqn, other=0.0).to(DOT)
        a = dt * A  # log2 of each step's decay
        acum = tl.cumsum(a, axis=0)
        a_tot = tl.sum(a, axis=0)
        v = x * dt[:, None]
        y = Dh * x  # the skip term starts the accumulator, so x is not held to the end of the chunk
        G = tl.dot(Cm, tl.trans(Bm), input_precision=PREC)  # (Q, Q): C_i·B_j
        decay = tl.where(causal, tl.exp2(acum[:, None] - acum[None, :]), 0.0)
        y = tl.dot((G * decay).to(DOT), v.to(DOT), y, input_precision=PREC)  # (Q, P)
        if c > 0:  # rows of C scaled by their decay from the chunk's start, so the product accumulates onto y
            # scaled in the operands' dtype: a 16-bit product, no float32 round trip of the (Q, N) tile (3.08 →
            # 2.95 ms per call; error against float64 2.89e-3 → 2.92e-3 in bf16)
            Cs = Cm * tl.exp2(acum).to(DOT)[:, None]
            y = tl.dot(Cs, tl.trans(state).to(DOT), y, input_precision=PREC)
        if c < n_chunks - 1:
            w = tl.exp2(a_tot - acum)  # decay from each step to the chunk's end
            # accumulate onto the decayed state: no second (P, N) float32 tile for the product
            state = tl.dot(tl.trans((v * w[:, None]).to(DOT)), Bm, state * tl.exp2(a_tot), input_precision=PREC)
        tl.store(y_base + t[:, None] * sy_l + offs_p[None, :] * sy_p, y.to(y_ptr.dtype.element_ty), mask=mqp)


@triton.jit
def _ssd_bwd_states_kernel(
    u_ptr, dt_ptr, A_ptr, k_ptr, st_ptr, fst_ptr, cross_ptr,
    L, nheads, seqs_per_dir, heads_per_group, P: tl.constexpr, N: tl.constexpr,
    su_s, su_l, su_h, su_p,
    sdt_s, sdt_l, sdt_h,
    sk_s, sk_l, sk_g, sk_n,
    sst_s, sst_h, sst_c, sst_p, sst_n,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    DIR_MODE: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr, BACKWARD: tl.constexpr,
    HEADS_FIRST: tl.constexpr,
):
    """The chunk-boundary states of one (sequence, head), for `_ssd_bwd_chunk_kernel`. The only sequential part of
    the backward pass: one product per chunk.

    BACKWARD=False (u = x, k = B): S_c, the state entering chunk c, into slot c for c ≥ 1,
        S_{c+1} = exp(Σa) S_c + Σ_j exp(Σa − acum_j) dt_j x_j ⊗ B_j.
    BACKWARD=True (u = dy, k = C): dS_{c+1}, the gradient of the state leaving chunk c, into slot c for c < last,
        dS_c = exp(Σa) dS_{c+1} + Σ_i exp(acum_i) dy_i ⊗ C_i,
    and, with the forward sweep's states fst, the chunk's da term for the pairs i after it and j before it,
    exp(Σa)·⟨dS_{c+1}, S_c⟩, into cross (s, h, chunks) for c ≥ 1 (held in the chunk kernel, the two state tiles
    cost it spills). A load and a sum beside the sweep's product, off its chain."""
    s, h = _sequence_and_head(HEADS_FIRST)
    d, reverse = _direction(s, seqs_per_dir, DIR_MODE)
    s64 = s.to(tl.int64)
    u_base = u_ptr + s64 * su_s + h * su_h
    dt_base = dt_ptr + s64 * sdt_s + h * sdt_h
    k_base = k_ptr + s64 * sk_s + (h // heads_per_group) * sk_g
    st_base = st_ptr + s64 * sst_s + h * sst_h
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    st_offs = offs_p[:, None] * sst_p + offs_n[None, :] * sst_n
    mpn = _tile_mask(offs_p < P, offs_n, N, BLOCK_N)
    A = tl.load(A_ptr + d * nheads + h).to(tl.float32) * LOG2E
    state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    n_chunks = tl.cdiv(L, BLOCK_Q)
    for i in range(0, n_chunks - 1):
        c = n_chunks - 1 - i if BACKWARD else i
        offs_q, mq, t = _chunk_rows(c, L, reverse, BLOCK_Q)
        u = tl.load(u_base + t[:, None] * su_l + offs_p[None, :] * su_p, mask=_tile_mask(mq, offs_p, P, BLOCK_P),
                    other=0.0).to(tl.float32)
        dt = tl.load(dt_base + t * sdt_l, mask=mq, other=0.0).to(tl.float32)
        km = tl.load(k_base + t[:, None] * sk_l + offs_n[None, :] * sk_n, mask=_tile_mask(mq, offs_n, N, BLOCK_N),
                     other=0.0).to(DOT)
        a = dt * A  # log2 of each step's decay
        acum = tl.cumsum(a, axis=0)
        a_tot = tl.sum(a, axis=0)
        if BACKWARD:
            S_c = tl.load(fst_ptr + s64 * sst_s + h * sst_h + c * sst_c + st_offs, mask=mpn, other=0.0)
            tl.store(cross_ptr + (s64 * nheads + h) * n_chunks + c,
                     tl.exp2(a_tot) * tl.sum(tl.sum(state * S_c.to(tl.float32), axis=1), axis=0))  # state: dS_{c+1}
            wu = u * tl.exp2(acum)[:, None]  # dy_i · exp(acum_i)
            slot = c - 1
        else:
            wu = u * (dt * tl.exp2(a_tot - acum))[:, None]  # v_j · exp(Σa − acum_j)
            slot = c + 1
        state = tl.dot(tl.trans(wu.to(DOT)), km, state * tl.exp2(a_tot), input_precision=PREC)
        tl.store(st_base + slot * sst_c + st_offs, state.to(st_ptr.dtype.element_ty), mask=mpn)


@triton.jit
def _ssd_bwd_chunk_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dy_ptr, st_ptr, dst_ptr, cross_ptr,
    dx_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr,
    L, nheads, seqs_per_dir, heads_per_group, P: tl.constexpr, N: tl.constexpr,
    sx_s, sx_l, sx_h, sx_p,
    sdt_s, sdt_l, sdt_h,
    sb_s, sb_l, sb_g, sb_n,
    sc_s, sc_l, sc_g, sc_n,
    sdy_s, sdy_l, sdy_h, sdy_p,
    sdx_s, sdx_l, sdx_h, sdx_p,
    sdb_s, sdb_l, sdb_h, sdb_n,  # dB and dC per-head buffers (s, l, h, n) share one layout
    sst_s, sst_h, sst_c, sst_p, sst_n,  # states and state gradients (s, h, chunks, p, n) share one layout
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    DIR_MODE: tl.constexpr, HAS_D: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr, STATES: tl.constexpr,
):
    """All gradients of one chunk of one (sequence, head): one program each, on a flat grid with the heads of a
    chunk neighbouring (they share its B and C tiles through L2). STATES: the sequence has several chunks; the
    state entering the chunk, S_c, and the gradient of the state leaving it, dS_{c+1}, come from
    `_ssd_bwd_states_kernel` (slots 0 and the last are never read: zero), with the da term exp(Σa)·⟨dS_{c+1}, S_c⟩.

    da_k = Σ_{i ≥ k > j} M_ij (the pairs whose decay contains step k) is summed pair set by pair set, without the
    C·dC − B·dB cancellation that bf16 products make inaccurate over long sequences: i and j in the chunk (a masked
    2-D prefix sum of M), i in it and j before (Σ_{i≥k} dy_i·y_inter_i = Σ_{i≥k} C_i·dC_inter_i), i after it and j
    in it (Σ_{j<k} v_j·dv_inter_j), and i after, j before (exp(Σa)·⟨dS_{c+1}, S_c⟩, the same for every k, from
    the state sweep)."""
    pid = tl.program_id(0)
    h = pid % nheads
    sc = pid // nheads
    n_chunks = tl.cdiv(L, BLOCK_Q)
    c = sc % n_chunks
    s = sc // n_chunks
    d, reverse = _direction(s, seqs_per_dir, DIR_MODE)
    g = h // heads_per_group
    s64 = s.to(tl.int64)
    offs_q, mq, t = _chunk_rows(c, L, reverse, BLOCK_Q)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mqp = _tile_mask(mq, offs_p, P, BLOCK_P)
    mqn = _tile_mask(mq, offs_n, N, BLOCK_N)
    # tiles are held in the products' dtype and widened where used: the kernel is at the register limit
    x = tl.load(x_ptr + s64 * sx_s + h * sx_h + t[:, None] * sx_l + offs_p[None, :] * sx_p, mask=mqp,
                other=0.0).to(DOT)
    dy = tl.load(dy_ptr + s64 * sdy_s + h * sdy_h + t[:, None] * sdy_l + offs_p[None, :] * sdy_p, mask=mqp,
                 other=0.0).to(DOT)
    dt = tl.load(dt_ptr + s64 * sdt_s + h * sdt_h + t * sdt_l, mask=mq, other=0.0).to(tl.float32)
    Bm = tl.load(B_ptr + s64 * sb_s + g * sb_g + t[:, None] * sb_l + offs_n[None, :] * sb_n, mask=mqn,
                 other=0.0).to(DOT)
    Cm = tl.load(C_ptr + s64 * sc_s + g * sc_g + t[:, None] * sc_l + offs_n[None, :] * sc_n, mask=mqn,
                 other=0.0).to(DOT)
    A = tl.load(A_ptr + d * nheads + h).to(tl.float32)
    a = dt * (A * LOG2E)  # log2 of each step's decay
    acum = tl.cumsum(a, axis=0)
    v = (x.to(tl.float32) * dt[:, None]).to(DOT)
    causal = offs_q[:, None] >= offs_q[None, :]
    decay = tl.exp2(tl.where(causal, acum[:, None] - acum[None, :], -float("inf")))
    G = tl.dot(Cm, tl.trans(Bm), input_precision=PREC) * decay  # (Q, Q): exp(·) C_i·B_j, i ≥ j
    Gd_raw = tl.dot(dy, tl.trans(v), input_precision=PREC)  # (Q, Q): dy_i·v_j
    # pairs inside the chunk: Σ_{i ≥ k} Σ_{j < k} M_ij, M in float32, the inner sum a row-wise exclusive prefix sum
    # (a float32 scan in registers: a product with a 0/1 matrix took 32 more registers and rounded M to tf32)
    M = G * Gd_raw
    da = tl.sum(tl.where(causal, tl.cumsum(M, axis=1) - M, 0.0), axis=0)
    Gd = (Gd_raw * decay).to(DOT)
    G = G.to(DOT)
    if STATES:  # S_c (zero entering chunk 0) and dS_{c+1} (zero leaving the last chunk)
        st_offs = s64 * sst_s + h * sst_h + c * sst_c + offs_p[:, None] * sst_p + offs_n[None, :] * sst_n
        mpn = _tile_mask(offs_p < P, offs_n, N, BLOCK_N)
        c_p = tl.zeros_like(offs_p) + c  # the chunk as a (BLOCK_P,) vector, to mask whole tiles
        dS = tl.load(dst_ptr + st_offs, mask=mpn & (c_p < n_chunks - 1)[:, None], other=0.0).to(DOT)
        a_tot = tl.sum(a, axis=0)
        w = tl.exp2(a_tot - acum)  # decay from each step to the chunk's end
    # dx first, then dB, then dC, each stored before the next product
    dv = tl.dot(tl.trans(G), dy, input_precision=PREC)  # (Q, P)
    if STATES:  # i after the chunk, j in it
        dv_inter = w[:, None] * tl.dot(Bm, tl.trans(dS), input_precision=PREC)
        dv += dv_inter
        pj = tl.sum(v.to(tl.float32) * dv_inter, axis=1)
        da += tl.cumsum(pj, axis=0) - pj  # Σ_{j < k}
    dvx = tl.sum(dv * x.to(tl.float32), axis=1)
    dx = dv * dt[:, None]
    if HAS_D:
        dx += tl.load(D_ptr + d * nheads + h).to(tl.float32) * dy.to(tl.float32)
        tl.atomic_add(dD_ptr + d * nheads + h, tl.sum(tl.sum(dy.to(tl.float32) * x.to(tl.float32), axis=1), axis=0))
    tl.store(dx_ptr + s64 * sdx_s + h * sdx_h + t[:, None] * sdx_l + offs_p[None, :] * sdx_p,
             dx.to(dx_ptr.dtype.element_ty), mask=mqp)
    db_offs = s64 * sdb_s + h * sdb_h + t[:, None] * sdb_l + offs_n[None, :] * sdb_n
    dB = tl.dot(tl.trans(Gd), Cm, input_precision=PREC)  # (Q, N)
    if STATES:
        dB = tl.dot((v.to(tl.float32) * w[:, None]).to(DOT), dS, dB, input_precision=PREC)
    tl.store(dB_ptr + db_offs, dB.to(dB_ptr.dtype.element_ty), mask=mqn)
    dC = tl.dot(Gd, Bm, input_precision=PREC)  # (Q, N)
    if STATES:  # i in the chunk, j before it; then i after the chunk, j before it
        S = tl.load(st_ptr + st_offs, mask=mpn & (c_p > 0)[:, None], other=0.0).to(DOT)
        dC_inter = tl.exp2(acum)[:, None] * tl.dot(dy, S, input_precision=PREC)
        qi = tl.sum(Cm.to(tl.float32) * dC_inter, axis=1)
        da += tl.sum(qi, axis=0) - tl.cumsum(qi, axis=0) + qi  # Σ_{i ≥ k}
        da += tl.load(cross_ptr + (s64 * nheads + h) * n_chunks + c)  # i after, j before: from the state sweep
        dC += dC_inter
    tl.store(dC_ptr + db_offs, dC.to(dC_ptr.dtype.element_ty), mask=mqn)
    da = tl.where(mq, da, 0.0)
    tl.atomic_add(dA_ptr + d * nheads + h, tl.sum(da * dt, axis=0))
    tl.store(ddt_ptr + s64 * sdt_s + h * sdt_h + t * sdt_l, dvx + da * A, mask=mq)


@triton.jit
def _cb_short_kernel(
    B_ptr, C_ptr, G_ptr, cw_ptr, cb_ptr,
    L, ngroups, seqs_per_dir, CH, sw_d, sw_c, sw_k,
    sb_s, sb_l, sb_g, sb_n,
    sc_s, sc_l, sc_g, sc_n,
    sg_s, sg_g,
    N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    DIR_MODE: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr, CONV_K: tl.constexpr, FAST_SILU: tl.constexpr,
):
    """C Bᵀ of a one-chunk sequence in scan order, zero above the diagonal: G (BLOCK_Q × BLOCK_Q) per (sequence,
    group), computed once for all the group's heads. One program per (sequence, group). CONV_K > 0: B and C are the
    raw in-projection, convolved here and passed through SiLU (weights (ndir, CH, CONV_K), strides sw_*, in Mamba2's
    channel order [x, B, C]: B's channels are the last 2·groups·N but groups·N)."""
    s, g = _split_program_id(ngroups)
    d, reverse, s64, offs_q, mq, t = _one_chunk_rows(s, L, seqs_per_dir, DIR_MODE, BLOCK_Q)
    offs_n = tl.arange(0, BLOCK_N)
    mqn = _tile_mask(mq, offs_n, N, BLOCK_N)
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
def _ssd_fwd_short_kernel(
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
    """One chunk (L ≤ BLOCK_Q): y = (G ∘ decay) v + D x with the causal C Bᵀ tile G from `_cb_short_kernel`. One
    small program per (sequence, head); the heads of a sequence are neighbouring programs, so G comes from L2.
    Since G is zero above the diagonal, the decay needs no mask: exp2(min(cum_i − cum_j, 0)) is finite there.
    HEADS_FIRST: grid (heads, sequences); else a flat grid (sequences past the grid's second dimension), whose
    index division measured 13% slower."""
    if HEADS_FIRST:
        s, h = _sequence_and_head(True)
    else:
        s, h = _split_program_id(nheads)
    d, reverse, s64, offs_q, mq, t = _one_chunk_rows(s, L, seqs_per_dir, DIR_MODE, BLOCK_Q)
    offs_p = tl.arange(0, BLOCK_P)
    mqp = _tile_mask(mq, offs_p, P, BLOCK_P)
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


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def block_q_for(length: int) -> int:
    """Chunk length of the fast scan: BSMAMBA2_SSD_BLOCK (tuned: 64); a sequence no longer than that is one chunk
    of its own (power-of-two) size, as the band axis (62) is."""
    block = int(os.environ.get("BSMAMBA2_SSD_BLOCK", "64"))
    return _block(length) if length <= block else block


def _heads_first(seqs: int) -> bool:
    """Grid order of the per-(sequence, head) kernels: heads first (BSMAMBA2_SSD_HEADS_FIRST=0 turns it off), unless
    the sequences exceed the grid's second dimension (65535)."""
    return seqs <= 65535 and os.environ.get("BSMAMBA2_SSD_HEADS_FIRST", "1") not in ("", "0")


def _num_warps(kernel: str, default: int) -> int:
    """Warps per program: BSMAMBA2_SSD_WARPS_<kernel> (FWD, FWD_SHORT, BWD for the chunk kernel, BWD_STATES), else
    the tuned default."""
    return int(os.environ.get(f"BSMAMBA2_SSD_WARPS_{kernel}", default))


def _num_stages(x: Tensor) -> int:
    """Software-pipelining stages (BSMAMBA2_SSD_STAGES overrides for 16-bit inputs). float32 tiles are twice as
    large: no pipelining, or shared memory runs out on the head loop."""
    return 1 if x.dtype == torch.float32 else int(os.environ.get("BSMAMBA2_SSD_STAGES", "3"))


def _sm90_scan() -> bool:
    """Whether long-sequence forward scans on Hopper GPUs take the Gluon kernel (`ssd_sm90`, where it applies):
    yes unless BSMAMBA2_SSD_GLUON=0 (for A/B runs; H200, paper size: 2.31 against 3.00 ms per call)."""
    return os.environ.get("BSMAMBA2_SSD_GLUON", "1") not in ("", "0")


def time_scan_kernel(x: Tensor, B: Tensor, C: Tensor, block_q: int) -> str:
    """Which kernel `ssd_fwd` runs for a long sequence with these inputs, scanned in chunks of block_q
    (`block_q_for`): "gluon-sm90" or "triton"."""
    from bsmamba2.kernels import ssd_sm90  # noqa: PLC0415  (imported here: it builds on this module's helpers)

    return "gluon-sm90" if _sm90_scan() and ssd_sm90.applies(x, B, C, block_q) else "triton"


def band_scan_kernel(x: Tensor, B: Tensor, C: Tensor, x_conv, bc_conv, dt_bias, z) -> str:
    """Which kernels `ssd_fwd` runs for a one-chunk sequence with these inputs and fused options: "gluon-sm90"
    (`ssd_short_sm90`, one kernel on Hopper GPUs, for calls with every fused option: the band axis at inference)
    unless BSMAMBA2_SSD_GLUON or BSMAMBA2_SSD_GLUON_BAND is 0, else "triton" (the C·Bᵀ stage, then the scan)."""
    from bsmamba2.kernels import ssd_short_sm90  # noqa: PLC0415  (imported here: it builds on this module's helpers)

    on = _sm90_scan() and os.environ.get("BSMAMBA2_SSD_GLUON_BAND", "1") not in ("", "0")
    fused = (x_conv is not None and bc_conv is not None and dt_bias is not None and z is not None
             and x_conv[0].shape[-1] == bc_conv[0].shape[-1])
    if on and fused and ssd_short_sm90.applies(x, B, C, z, x_conv[0].shape[-1]):
        return "gluon-sm90"
    return "triton"


def _prec(x: Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _dot_dtype(x: Tensor):
    """Operand dtype of the kernels' matrix products: the input's; float32 under Triton's CPU interpreter, whose
    bf16 products are wrong (Triton 3.9)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[x.dtype]


def _check(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, dir_mode: int) -> None:
    s, l, h, p = x.shape
    if dt.shape != (s, l, h) or B.shape[:2] != (s, l) or B.shape != C.shape:
        raise ValueError(f"ssd shapes disagree: x {tuple(x.shape)}, dt {tuple(dt.shape)}, B {tuple(B.shape)}, "
                         f"C {tuple(C.shape)}")
    ndir = 2 if dir_mode == 2 else 1
    if A.shape != (ndir, h) or (D is not None and D.shape != (ndir, h)):
        raise ValueError(f"A and D must be ({ndir}, {h}) for dir_mode {dir_mode}")
    if dir_mode == 2 and s % 2:
        raise ValueError("dir_mode 2 needs an even number of sequences (forward half, then backward half)")
    if h % B.shape[2]:
        raise ValueError(f"heads ({h}) must be a multiple of groups ({B.shape[2]})")


def causal_cb(B: Tensor, C: Tensor, dir_mode: int = 0, conv: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """C Bᵀ of one-chunk sequences, in scan order and zero above the diagonal: B/C (s, l, g, n), l ≤ the chunk →
    G (s, g, Q, Q), Q = `block_q_for(l)`, in B's dtype (rows and columns past l are zero). The forward scan's first
    stage on the band axis; its twin is `causal_cb_reference`.

    conv = (weight (ndir, c, k), bias (ndir, c)), channels in Mamba2's order [x, B, C]: B and C are raw, and pass
    through conv1d + SiLU first (direction 1 anti-causal in memory order, as `conv_silu_fwd`)."""
    s, l, g, n = B.shape
    bq = block_q_for(l)
    if l > bq:
        raise ValueError(f"causal_cb takes sequences of one chunk (length <= {bq}), got {l}")
    G = torch.empty(s, g, bq, bq, device=B.device, dtype=B.dtype)
    cw, cb = (B, B) if conv is None else (conv[0], conv[1].contiguous())
    w_strides = (0, 0, 0) if conv is None else cw.stride()
    if conv is not None and cw.shape[1] < 2 * g * n:
        raise ValueError(f"causal_cb's conv weight must end with B's and C's {2 * g * n} channels, got "
                         f"{tuple(cw.shape)}")
    if s:
        _cb_short_kernel[(s * g,)](B, C, G, cw, cb, l, g, s // 2 if dir_mode == 2 else s, cw.shape[1], *w_strides,
                                   *B.stride(), *C.stride(), G.stride(0), G.stride(1), N=n, BLOCK_Q=bq,
                                   BLOCK_N=_block(n),
                                   DIR_MODE=dir_mode, PREC=_prec(B), DOT=_dot_dtype(B),
                                   CONV_K=0 if conv is None else cw.shape[-1], FAST_SILU=fast_silu(B.dtype),
                                   num_warps=4)
    return G


def causal_cb_reference(B: Tensor, C: Tensor, dir_mode: int = 0) -> Tensor:
    """`causal_cb` in plain PyTorch: sequences scanned backward (dir_mode 1, or the second half for 2) flipped."""
    s, l, g, n = B.shape
    bq = block_q_for(l)
    rev = torch.zeros(s, dtype=torch.bool, device=B.device)
    if dir_mode == 1:
        rev[:] = True
    elif dir_mode == 2:
        rev[s // 2:] = True
    Bs = torch.where(rev[:, None, None, None], B.flip(1), B).float()
    Cs = torch.where(rev[:, None, None, None], C.flip(1), C).float()
    G = torch.einsum("sign,sjgn->sgij", Cs, Bs).tril()
    return F.pad(G, (0, bq - l, 0, bq - l)).to(B.dtype)


def _fused_inputs(x: Tensor, A: Tensor, x_conv, dt_bias, z: Tensor | None, ss: Tensor | None):
    """The forward kernels' fused-option arguments: pointers (conv weight, conv bias, dt bias, z, Σg²), the conv's
    channel count and its weight's three strides, the strides of z and Σg², and the constexprs. Options that are
    off get placeholders."""
    s, l, h, p = x.shape
    ndir = A.shape[0]
    cw, cb = (A, A) if x_conv is None else (x_conv[0], x_conv[1].contiguous())
    if x_conv is not None and (cw.shape[0] != ndir or cw.shape[1] < h * p):
        raise ValueError(f"the conv weight must be ({ndir}, c, k) with x's {h * p} channels first, got "
                         f"{tuple(cw.shape)}")
    if dt_bias is not None and dt_bias.shape != (ndir, h):
        raise ValueError(f"dt_bias must be ({ndir}, {h}), got {tuple(dt_bias.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must be shaped like x {tuple(x.shape)}, got {tuple(z.shape)}")
    dtb = A if dt_bias is None else dt_bias.float().contiguous()
    ptrs = (cw, cb, dtb, A if z is None else z, A if ss is None else ss)
    strides = (*(z.stride() if z is not None else (0,) * 4), *(ss.stride() if ss is not None else (0,) * 3))
    meta = dict(CONV_K=0 if x_conv is None else cw.shape[-1], SOFTPLUS=dt_bias is not None, GATE=z is not None,
                FAST_SILU=fast_silu(x.dtype))
    channels = (cw.shape[1], *cw.stride()) if x_conv is not None else (0, 0, 0, 0)
    return ptrs, channels, strides, meta


def ssd_fwd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, dir_mode: int = 0, *,
            x_conv: tuple[Tensor, Tensor] | None = None, bc_conv: tuple[Tensor, Tensor] | None = None,
            dt_bias: Tensor | None = None, z: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Forward scan. x (s, l, h, p), dt (s, l, h), A/D (ndir, h), B/C (s, l, g, n), any strides → y (s, l, h, p).

    Fused options for inference (no gradients) on one-chunk sequences, which read the in-projection in place:
      x_conv  (weight (ndir, c, k), bias (ndir, c)), channels in Mamba2's order [x, B, C]: x is raw and passes
              through conv1d + SiLU in the kernel (direction 1 anti-causal in memory order, as `conv_silu_fwd`).
              The weight may have any strides; tap-major storage (`conv.conv_taps_major`) reads fastest.
      bc_conv the same weights: B and C are raw too, convolved in the C·Bᵀ stage; one-chunk sequences only.
      dt_bias (ndir, h): dt is raw; the step is softplus(dt + dt_bias).
      z       (s, l, h, p): returns (y · silu(z), Σ_p (y · silu(z))² per (s, l, h) in float32), the gated RMSNorm's
              numerator and its per-head statistics.
    """
    _check(x, dt, A, B, C, D, dir_mode)
    s, l, h, p = x.shape
    g, n = B.shape[2:]
    y = torch.empty(s, l, h, p, device=x.device, dtype=x.dtype)
    ss = None if z is None else torch.empty(s, l, h, device=x.device, dtype=torch.float32)
    result = y if z is None else (y, ss)
    if s == 0 or l == 0:
        return result
    bq = block_q_for(l)
    if l > bq and (x_conv, bc_conv, dt_bias, z) != (None,) * 4:
        raise ValueError(f"the fused options are for one-chunk sequences (length <= {bq}); on longer ones run "
                         "conv_silu_fwd, softplus_dt and gated_proj as their own passes")
    A, Dc = A.float().contiguous(), (D.float().contiguous() if D is not None else A)
    seqs_per_dir = s // 2 if dir_mode == 2 else s
    meta = dict(BLOCK_Q=bq, BLOCK_P=_block(p), DIR_MODE=dir_mode, HAS_D=D is not None, PREC=_prec(x),
                DOT=_dot_dtype(x))
    heads_first = _heads_first(s)
    if l <= bq and band_scan_kernel(x, B, C, x_conv, bc_conv, dt_bias, z) == "gluon-sm90":
        from bsmamba2.kernels.ssd_short_sm90 import ssd_fwd_short_sm90  # noqa: PLC0415

        ssd_fwd_short_sm90(x, dt, A, B, C, D if D is None else Dc, dir_mode, x_conv, bc_conv, dt_bias, z, y, ss)
        return result
    if l <= bq:
        G = causal_cb(B, C, dir_mode, conv=bc_conv)  # (s, g, bq, bq)
        ptrs, channels, fstrides, fmeta = _fused_inputs(x, A, x_conv, dt_bias, z, ss)
        _ssd_fwd_short_kernel[(h, s) if heads_first else (s * h,)](
            x, dt, A, G, Dc, y, *ptrs, l, h, seqs_per_dir, h // g, *channels, *x.stride(), *dt.stride(), G.stride(0),
            G.stride(1), *y.stride(), *fstrides, P=p, **meta, **fmeta, HEADS_FIRST=heads_first, num_stages=1,
            num_warps=_num_warps("FWD_SHORT", 4))
    elif time_scan_kernel(x, B, C, bq) == "gluon-sm90":
        from bsmamba2.kernels.ssd_sm90 import ssd_fwd_sm90  # noqa: PLC0415

        ssd_fwd_sm90(x, dt, A, B, C, D if D is None else Dc, dir_mode, out=y)
    else:
        grid = (h, s) if heads_first else (s, h)
        _ssd_fwd_kernel[grid](x, dt, A, B, C, Dc, y, l, h, seqs_per_dir, h // g, *x.stride(), *dt.stride(),
                              *B.stride(), *C.stride(), *y.stride(), P=p, N=n, BLOCK_N=_block(n), **meta,
                              HEADS_FIRST=heads_first, num_stages=_num_stages(x), num_warps=_num_warps("FWD", 4))
    return result


def ssd_bwd(dy: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
            dir_mode: int = 0, dx: Tensor | None = None, dB: Tensor | None = None,
            dC: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients (dx, ddt, dA, dB, dC, dD) of the scan for the output gradient dy `(s, l, h, p)`.

    dx has x's dtype (or is written into `dx`, any (s, l, h, p) tensor, if given); ddt, dA, dD are float32; dB and
    dC are float32 `(s, l, g, n)`, summed over each group's heads (or written into `dB`, `dC`, any (s, l, g, n)
    tensors of any dtype and strides, if given: the head sum goes straight there).
    """
    s, l, h, p = x.shape
    g, n = B.shape[2:]
    dev = x.device
    if dx is None:
        dx = torch.empty(s, l, h, p, device=dev, dtype=x.dtype)
    elif dx.shape != x.shape:
        raise ValueError(f"dx must be shaped like x {tuple(x.shape)}, got {tuple(dx.shape)}")
    ddt = torch.empty(s, l, h, device=dev, dtype=torch.float32)
    dA = torch.zeros_like(A, dtype=torch.float32)
    dD = torch.zeros_like(A, dtype=torch.float32)
    for out in (dB, dC):
        if out is not None and out.shape != (s, l, g, n):
            raise ValueError(f"dB and dC must be shaped like B {(s, l, g, n)}, got {tuple(out.shape)}")
    if s == 0 or l == 0:
        dB, dC = (torch.zeros(s, l, g, n, device=dev) if t is None else t.zero_() for t in (dB, dC))
        return dx.zero_(), ddt, dA, dB, dC, (dD if D is not None else None)
    if dt.stride() != ddt.stride():
        dt = dt.contiguous()  # ddt is indexed with dt's strides
    bq = block_q_for(l)
    n_chunks = triton.cdiv(l, bq)
    A_, D_ = A.float().contiguous(), (D.float().contiguous() if D is not None else A.float().contiguous())
    meta = dict(BLOCK_Q=bq, BLOCK_P=_block(p), BLOCK_N=_block(n), DIR_MODE=dir_mode, PREC=_prec(x),
                DOT=_dot_dtype(x))
    sizes = (l, h, s // 2 if dir_mode == 2 else s, h // g, p, n)
    # per-head dB and dC (no atomics), summed over each group's heads below
    buf_dtype = torch.float32 if x.dtype == torch.float32 else x.dtype
    dBh = torch.empty(s, l, h, n, device=dev, dtype=buf_dtype)
    dCh = torch.empty_like(dBh)
    if n_chunks > 1:  # the states entering each chunk and their gradients: (s, h, chunks, p, n)
        states = torch.empty(s, h, n_chunks, p, n, device=dev, dtype=buf_dtype)
        dstates = torch.empty_like(states)
        cross = torch.zeros(s, h, n_chunks, device=dev, dtype=torch.float32)  # exp(Σa)·⟨dS_{c+1}, S_c⟩
        heads_first = _heads_first(s)
        grid = (h, s) if heads_first else (s, h)
        for u, k, out, backward in ((x, B, states, False), (dy, C, dstates, True)):
            _ssd_bwd_states_kernel[grid](u, dt, A_, k, out, states, cross, *sizes, *u.stride(), *dt.stride(),
                                         *k.stride(), *out.stride(), **meta, BACKWARD=backward, HEADS_FIRST=heads_first,
                                         num_stages=_num_stages(x), num_warps=_num_warps("BWD_STATES", 4))
        st_strides = states.stride()
    else:
        states = dstates = cross = dBh  # placeholders: one chunk has no states
        st_strides = (0,) * 5
    _ssd_bwd_chunk_kernel[(s * n_chunks * h,)](
        x, dt, A_, B, C, D_, dy, states, dstates, cross, dx, ddt, dA, dBh, dCh, dD, *sizes, *x.stride(), *dt.stride(),
        *B.stride(), *C.stride(), *dy.stride(), *dx.stride(), *dBh.stride(), *st_strides, **meta,
        HAS_D=D is not None, STATES=n_chunks > 1, num_stages=1, num_warps=_num_warps("BWD", 4))
    dB, dC = (_sum_heads(per_head, g, out) for per_head, out in ((dBh, dB), (dCh, dC)))
    return dx, ddt, dA, dB, dC, (dD if D is not None else None)


def _sum_heads(per_head: Tensor, g: int, out: Tensor | None) -> Tensor:
    """(s, l, h, n) per-head gradients summed over each group's heads (float32 accumulation) → (s, l, g, n): into
    `out` in its dtype if given, else a new float32 tensor."""
    s, l, h, n = per_head.shape
    groups = per_head.view(s, l, g, h // g, n)
    if out is None:
        return groups.sum(3, dtype=torch.float32)
    return torch.sum(groups, 3, dtype=out.dtype, out=out)


class SSDScan(torch.autograd.Function):
    """Autograd wrapper: y = SSD(x, dt, A, B, C, D) with the Triton kernels for forward and backward."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, dir_mode):
        y = ssd_fwd(x, dt, A, B, C, D, dir_mode)
        ctx.save_for_backward(x, dt, A, B, C, D)
        ctx.dir_mode = dir_mode
        return y

    @staticmethod
    def backward(ctx, dy):
        x, dt, A, B, C, D = ctx.saved_tensors
        dx, ddt, dA, dB, dC, dD = ssd_bwd(dy, x, dt, A, B, C, D, ctx.dir_mode)
        return (dx, ddt.to(dt.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
                None if dD is None else dD.to(D.dtype), None)


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
             chunk_size: int | None = None, reverse: bool = False) -> Tensor:
    """Drop-in for `bsmamba2.ssd.ssd_chunked` (no initial/final state): x (b, l, h, p), dt (b, l, h), A (h,),
    B/C (b, l, g, n), D (h,) or None → y (b, l, h, p). `reverse=True` scans from the end (as on a flipped input).

    `chunk_size` is accepted for interface compatibility; the kernels pick their own chunk (`block_q_for`), which
    changes only rounding, not the function.
    """
    del chunk_size
    if D is not None and D.dim() != 1:
        raise ValueError("the fast scan takes D of shape (heads,)")
    return SSDScan.apply(x, dt, A[None], B, C, None if D is None else D[None], 1 if reverse else 0)


def ssd_scan_bidirectional(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None) -> Tensor:
    """Both directions in one launch: the first half of the sequences (dim 0) is scanned forward with A[0], D[0],
    the second half backward with A[1], D[1]. x (2s, l, h, p), dt (2s, l, h), A/D (2, h), B/C (2s, l, g, n)."""
    return SSDScan.apply(x, dt, A, B, C, D, 2)
