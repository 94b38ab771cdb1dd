"""The time-axis forward scan (sequences of several chunks: 801 frames at the paper's size) as a Triton kernel.

Plain twin: `bsmamba2.ssd.ssd_chunked`; dispatcher: `ssd.ssd_fwd` (on Hopper GPUs it runs `ssd_time_sm90`, the same
function in Gluon, instead). Per head h, with a_t = dt_t·A_h, cum_t = Σ_{k≤t} a_k and v_t = dt_t·x_t:

    y_i = Σ_{j≤i} exp(cum_i − cum_j) (C_i·B_j) v_j + D_h x_i

One program owns one (sequence, head) and walks the sequence in chunks of BLOCK_Q steps, carrying the state
(headdim × d_state, float32) in registers, so no state goes to memory in the forward pass:

    intra-chunk   y  = (C Bᵀ ∘ decay) v                        the masked (attention-like) form, (Q×Q) tile
    inter-chunk   y += exp(acum) · C Sᵀ                        S: the state entering the chunk
    state         S  = exp(Σa) S + (v · exp(Σa − acum))ᵀ B
"""

from __future__ import annotations

import triton
import triton.language as tl

from bsmamba2.kernels.ssd_common import LOG2E, chunk_rows, direction, head_bases, sequence_and_head, tile_mask


@triton.jit
def time_fwd_kernel(
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
    No fused options here: this loop is latency-bound, and each of them (softplus of dt, gate, conv1d of x) cost
    more inside it than as its own pass."""
    s, h = sequence_and_head(HEADS_FIRST)
    d, reverse = direction(s, seqs_per_dir, DIR_MODE)
    x_base, b_base, c_base, y_base = head_bases(x_ptr, B_ptr, C_ptr, y_ptr, s, h, heads_per_group, sx_s, sx_h,
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
        offs_q, mq, t = chunk_rows(c, L, reverse, BLOCK_Q)
        mqp = tile_mask(mq, offs_p, P, BLOCK_P)
        mqn = tile_mask(mq, offs_n, N, BLOCK_N)
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
            # scaled in the operands' dtype: a 16-bit product, no float32 round trip of the (Q, N) tile
            Cs = Cm * tl.exp2(acum).to(DOT)[:, None]
            y = tl.dot(Cs, tl.trans(state).to(DOT), y, input_precision=PREC)
        if c < n_chunks - 1:
            w = tl.exp2(a_tot - acum)  # decay from each step to the chunk's end
            # accumulate onto the decayed state: no second (P, N) float32 tile for the product
            state = tl.dot(tl.trans((v * w[:, None]).to(DOT)), Bm, state * tl.exp2(a_tot), input_precision=PREC)
        tl.store(y_base + t[:, None] * sy_l + offs_p[None, :] * sy_p, y.to(y_ptr.dtype.element_ty), mask=mqp)
