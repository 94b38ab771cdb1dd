"""The scan's backward pass as Triton kernels, for both axes (plain twin: autograd through `bsmamba2.ssd`;
dispatcher: `ssd.ssd_bwd`).

Gradients (dy given; M_ij = exp(cum_i − cum_j)(C_i·B_j)(dy_i·v_j) for i ≥ j):
    dC_i = Σ_{j≤i} exp(·)(dy_i·v_j) B_j
    dv_j = Σ_{i≥j} exp(·)(C_i·B_j) dy_i
    dB_j = Σ_{i≥j} exp(·)(dy_i·v_j) C_i
    da_k = Σ_{i ≥ k > j} M_ij                  by pair sets (no C·dC − B·dB cancellation)
    dx = dt·dv + D·dy,  ddt = x·dv + A·da,  dA = Σ da·dt,  dD = Σ dy·x
with dB and dC summed over the heads of each group (B and C are shared by a group's heads).
The only sequential part is the chunk-boundary states: `bwd_states_kernel` walks each (sequence, head) once
forward for the states S_c entering each chunk and once backward for their gradients dS_c, one product per chunk,
and stores both. Then a chunk kernel computes every gradient of a chunk from its own tiles and those two states, in
parallel over chunks. Band-axis sequences (one chunk) skip the states. Two chunk kernels:
    `bwd_chunk_grouped_kernel` (the band axis by default; BSMAMBA2_SSD_BWD_GROUPED) one program per (sequence,
        chunk, group), looping over the group's heads:
        C·Bᵀ formed once; dx, ddt, da per head; dB and dC summed over the heads in float32 registers (in-chunk
        pairs through one (Q, Q) sum of the heads' exp(·)(dy_i·v_j), two products after the loop; the state
        terms in two (Q, N) accumulators) and written once, straight into the (s, l, g, n) outputs;
    `bwd_chunk_kernel` (the time axis by default) one program per (sequence, chunk, head), writing per-head dB
        and dC buffers (s, l, h, n) that the dispatcher sums over each group's heads (float32 atomics over 16
        heads were several times slower), ~8 GB of memory traffic per call at the training step's time axis.
On an H100 at the training step's shapes (batch 5) the grouped kernel takes 5.1 against 7.1 ms per band-axis call,
but 15.9 against 13.4 ms per time-axis call, where its serial loop over 16 heads in one 8-warp program (255
registers) leaves too little in flight (docs/perf-log.md, row 102).
"""

from __future__ import annotations

import triton
import triton.language as tl

from bsmamba2.kernels.ssd_common import LOG2E, chunk_rows, direction, sequence_and_head, tile_mask


@triton.jit
def bwd_states_kernel(
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
    """The chunk-boundary states of one (sequence, head), for `bwd_chunk_kernel`. The only sequential part of
    the backward pass: one product per chunk.

    BACKWARD=False (u = x, k = B): S_c, the state entering chunk c, into slot c for c ≥ 1,
        S_{c+1} = exp(Σa) S_c + Σ_j exp(Σa − acum_j) dt_j x_j ⊗ B_j.
    BACKWARD=True (u = dy, k = C): dS_{c+1}, the gradient of the state leaving chunk c, into slot c for c < last,
        dS_c = exp(Σa) dS_{c+1} + Σ_i exp(acum_i) dy_i ⊗ C_i,
    and, with the forward sweep's states fst, the chunk's da term for the pairs i after it and j before it,
    exp(Σa)·⟨dS_{c+1}, S_c⟩, into cross (s, h, chunks) for c ≥ 1 (held in the chunk kernel, the two state tiles
    cost it spills). A load and a sum beside the sweep's product, off its chain."""
    s, h = sequence_and_head(HEADS_FIRST)
    d, reverse = direction(s, seqs_per_dir, DIR_MODE)
    s64 = s.to(tl.int64)
    u_base = u_ptr + s64 * su_s + h * su_h
    dt_base = dt_ptr + s64 * sdt_s + h * sdt_h
    k_base = k_ptr + s64 * sk_s + (h // heads_per_group) * sk_g
    st_base = st_ptr + s64 * sst_s + h * sst_h
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    st_offs = offs_p[:, None] * sst_p + offs_n[None, :] * sst_n
    mpn = tile_mask(offs_p < P, offs_n, N, BLOCK_N)
    A = tl.load(A_ptr + d * nheads + h).to(tl.float32) * LOG2E
    state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    n_chunks = tl.cdiv(L, BLOCK_Q)
    for i in range(0, n_chunks - 1):
        c = n_chunks - 1 - i if BACKWARD else i
        offs_q, mq, t = chunk_rows(c, L, reverse, BLOCK_Q)
        u = tl.load(u_base + t[:, None] * su_l + offs_p[None, :] * su_p, mask=tile_mask(mq, offs_p, P, BLOCK_P),
                    other=0.0).to(tl.float32)
        dt = tl.load(dt_base + t * sdt_l, mask=mq, other=0.0).to(tl.float32)
        km = tl.load(k_base + t[:, None] * sk_l + offs_n[None, :] * sk_n, mask=tile_mask(mq, offs_n, N, BLOCK_N),
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
def bwd_chunk_kernel(
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
    `bwd_states_kernel` (slots 0 and the last are never read: zero), with the da term exp(Σa)·⟨dS_{c+1}, S_c⟩.

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
    d, reverse = direction(s, seqs_per_dir, DIR_MODE)
    g = h // heads_per_group
    s64 = s.to(tl.int64)
    offs_q, mq, t = chunk_rows(c, L, reverse, BLOCK_Q)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mqp = tile_mask(mq, offs_p, P, BLOCK_P)
    mqn = tile_mask(mq, offs_n, N, BLOCK_N)
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
        mpn = tile_mask(offs_p < P, offs_n, N, BLOCK_N)
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
def own_layout_dot(a, b, once, PREC: tl.constexpr):
    """tl.dot(a, b) in float32, computed in a loop of `once` trips (a run-time 1: the body is idempotent, any count
    ≥ 1 gives the product). Triton gives a product whose result feeds another product all warps along its rows
    (the flash-attention layout), which at 8 warps and 64 rows holds each element twice; the loop hides the
    consumer (a result that leaves a loop is not traced further), so the product gets the 4 × 2 warp layout of the
    others, half the registers."""
    acc = tl.zeros((a.shape[0], b.shape[1]), dtype=tl.float32)
    for _ in range(0, once):
        acc = tl.dot(a, b, input_precision=PREC)
    return acc


@triton.jit
def state_in_terms(dy, acum, S, Cm, dC, cross, PREC: tl.constexpr, DOT: tl.constexpr):
    """Of one head of a chunk, the terms of the state entering it, S_c (P, N): the head's da for the pairs j before
    the chunk and i in it, Σ_{i ≥ k} dy_i·y_inter_i with y_inter_i = exp(acum_i) S_c C_i (the sum
    Σ_{i ≥ k} C_i·dC_inter_i of `bwd_chunk_kernel`, without a (Q, N) tile of dC_inter), plus `cross`, the state
    sweep's term of i after the chunk; and dC + (exp(acum_i) dy_i) S_c, the head's dC_inter added to dC."""
    e = tl.exp2(acum)  # decay from the chunk's start to each step
    y_inter = tl.dot(Cm, tl.trans(S), input_precision=PREC)  # (Q, P): S_c C_i, undecayed
    qi = e * tl.sum(dy.to(tl.float32) * y_inter, axis=1)
    da = tl.sum(qi, axis=0) - tl.cumsum(qi, axis=0) + qi + cross  # Σ_{i ≥ k}, then i after, j before
    return da, tl.dot((dy.to(tl.float32) * e[:, None]).to(DOT), S, dC, input_precision=PREC)


@triton.jit
def bwd_chunk_grouped_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dy_ptr, st_ptr, dst_ptr, cross_ptr,
    dx_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr,
    L, nheads, seqs_per_dir, heads_per_group, P: tl.constexpr, N: tl.constexpr,
    sx_s, sx_l, sx_h, sx_p,
    sdt_s, sdt_l, sdt_h,
    sb_s, sb_l, sb_g, sb_n,
    sc_s, sc_l, sc_g, sc_n,
    sdy_s, sdy_l, sdy_h, sdy_p,
    sdx_s, sdx_l, sdx_h, sdx_p,
    sdb_s, sdb_l, sdb_g, sdb_n,  # the dB output (s, l, g, n)
    sdc_s, sdc_l, sdc_g, sdc_n,  # the dC output (s, l, g, n)
    sst_s, sst_h, sst_c, sst_p, sst_n,  # states and state gradients (s, h, chunks, p, n) share one layout
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    DIR_MODE: tl.constexpr, HAS_D: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr, STATES: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """All gradients of one chunk of one (sequence, group): one program each, looping over the group's heads, with
    dB and dC summed over those heads in float32 and stored once, straight into the (s, l, g, n) outputs.

    C·Bᵀ does not depend on the head (only the decay exp(acum_i − acum_j) does, through dt and A): it is formed
    once. Per head the program computes dx, ddt and the head's da as `bwd_chunk_kernel` does, by the same pair sets
    (the term of S_c by `state_in_terms`). Of dB and dC it keeps sums over the heads:
      in-chunk pairs   Gd = Σ_h exp(·)(dy_i·v_j), one (Q, Q) float32 sum, since B and C are the group's: dB = Gdᵀ C
                       and dC = Gd B are two products after the head loop, not two per head;
      STATES           dB += Σ_h (exp(Σa − acum_j) v_j) dS_{c+1} and dC += Σ_h (exp(acum_i) dy_i) S_c, two (Q, N)
                       float32 accumulators, one product each per head.
    SPLIT (with STATES): the terms of S_c (dC's accumulator, the da of pairs j before the chunk) run in a second
    loop over the heads, which reads dy and dt again and adds its da to the ddt the first loop stored: two lighter
    loops instead of one that spills (8 warps, sm_90a, Triton 3.9: 160 against 536 bytes of stack, 80 against 309
    local-memory instructions; the per-head kernel: 360 bytes, 196 instructions for each head;
    `tools/sm90_loop_stats.py --kernel bwd`)."""
    pid = tl.program_id(0)
    ngroups = nheads // heads_per_group
    g = pid % ngroups
    sc = pid // ngroups
    n_chunks = tl.cdiv(L, BLOCK_Q)
    c = sc % n_chunks
    s = sc // n_chunks
    d, reverse = direction(s, seqs_per_dir, DIR_MODE)
    s64 = s.to(tl.int64)
    offs_q, mq, t = chunk_rows(c, L, reverse, BLOCK_Q)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mqp = tile_mask(mq, offs_p, P, BLOCK_P)
    mqn = tile_mask(mq, offs_n, N, BLOCK_N)
    Bm = tl.load(B_ptr + s64 * sb_s + g * sb_g + t[:, None] * sb_l + offs_n[None, :] * sb_n, mask=mqn,
                 other=0.0).to(DOT)
    Cm = tl.load(C_ptr + s64 * sc_s + g * sc_g + t[:, None] * sc_l + offs_n[None, :] * sc_n, mask=mqn,
                 other=0.0).to(DOT)
    once = tl.minimum(heads_per_group, 1)
    CB = own_layout_dot(Cm, tl.trans(Bm), once, PREC)  # (Q, Q): C_i·B_j, every head's
    Gd_sum = tl.zeros((BLOCK_Q, BLOCK_Q), dtype=tl.float32)
    # Per-head tiles are addressed by row offsets that include the head (vectors) plus column offsets, so that no
    # 2-D offset or mask tile is loop-invariant: hoisted out of the head loop, each would hold registers throughout
    x_seq, dy_seq, dx_seq = x_ptr + s64 * sx_s, dy_ptr + s64 * sdy_s, dx_ptr + s64 * sdx_s
    dt_seq = dt_ptr + s64 * sdt_s
    if STATES:
        c_p = tl.zeros_like(offs_p) + c  # the chunk as a (BLOCK_P,) vector, to mask whole tiles
        st_seq, dst_seq = st_ptr + s64 * sst_s + c * sst_c, dst_ptr + s64 * sst_s + c * sst_c
        m_S = tile_mask((offs_p < P) & (c_p > 0), offs_n, N, BLOCK_N)  # S_c: zero entering chunk 0
        m_dS = tile_mask((offs_p < P) & (c_p < n_chunks - 1), offs_n, N, BLOCK_N)  # dS_{c+1}: zero leaving the last
        dB = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
        dC = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
    for i in range(0, heads_per_group):
        h = g * heads_per_group + i
        causal = (offs_q + i)[:, None] >= (offs_q + i)[None, :]  # i ≥ j (the head in it keeps it in the loop)
        x = tl.load(x_seq + (h * sx_h + t * sx_l)[:, None] + offs_p[None, :] * sx_p, mask=mqp, other=0.0).to(DOT)
        dy = tl.load(dy_seq + (h * sdy_h + t * sdy_l)[:, None] + offs_p[None, :] * sdy_p, mask=mqp,
                     other=0.0).to(DOT)
        dt = tl.load(dt_seq + h * sdt_h + t * sdt_l, mask=mq, other=0.0).to(tl.float32)
        A = tl.load(A_ptr + d * nheads + h).to(tl.float32)
        a = dt * (A * LOG2E)  # log2 of each step's decay
        acum = tl.cumsum(a, axis=0)
        v = (x.to(tl.float32) * dt[:, None]).to(DOT)
        decay = tl.exp2(tl.where(causal, acum[:, None] - acum[None, :], -float("inf")))
        G = CB * decay  # (Q, Q): exp(·) C_i·B_j, i ≥ j
        Gd_raw = tl.dot(dy, tl.trans(v), input_precision=PREC)  # (Q, Q): dy_i·v_j
        # pairs inside the chunk: Σ_{i ≥ k} Σ_{j < k} M_ij, the inner sum a row-wise exclusive prefix sum
        M = G * Gd_raw
        da = tl.sum(tl.where(causal, tl.cumsum(M, axis=1) - M, 0.0), axis=0)
        Gd_sum += Gd_raw * decay
        G = G.to(DOT)
        if STATES:
            st_offs = (h * sst_h + offs_p * sst_p)[:, None] + offs_n[None, :] * sst_n
            dS = tl.load(dst_seq + st_offs, mask=m_dS, other=0.0).to(DOT)
            w = tl.exp2(tl.sum(a, axis=0) - acum)  # decay from each step to the chunk's end
        dv = tl.dot(tl.trans(G), dy, input_precision=PREC)  # (Q, P)
        if STATES:  # i after the chunk, j in it
            dv_inter = w[:, None] * own_layout_dot(Bm, tl.trans(dS), once, PREC)
            dv += dv_inter
            pj = tl.sum(v.to(tl.float32) * dv_inter, axis=1)
            da += tl.cumsum(pj, axis=0) - pj  # Σ_{j < k}
        dvx = tl.sum(dv * x.to(tl.float32), axis=1)
        dx = dv * dt[:, None]
        if HAS_D:
            dx += tl.load(D_ptr + d * nheads + h).to(tl.float32) * dy.to(tl.float32)
            tl.atomic_add(dD_ptr + d * nheads + h,
                          tl.sum(tl.sum(dy.to(tl.float32) * x.to(tl.float32), axis=1), axis=0))
        tl.store(dx_seq + (h * sdx_h + t * sdx_l)[:, None] + offs_p[None, :] * sdx_p, dx.to(dx_ptr.dtype.element_ty),
                 mask=mqp)
        if STATES:
            dB = tl.dot((v.to(tl.float32) * w[:, None]).to(DOT), dS, dB, input_precision=PREC)
            if not SPLIT:
                S = tl.load(st_seq + st_offs, mask=m_S, other=0.0).to(DOT)
                da_S, dC = state_in_terms(dy, acum, S, Cm, dC, tl.load(cross_ptr + (s64 * nheads + h) * n_chunks + c),
                                          PREC, DOT)
                da += da_S
        da = tl.where(mq, da, 0.0)
        tl.atomic_add(dA_ptr + d * nheads + h, tl.sum(da * dt, axis=0))
        tl.store(ddt_ptr + s64 * sdt_s + h * sdt_h + t * sdt_l, dvx + da * A, mask=mq)
    if STATES and SPLIT:  # the terms of S_c: dC's accumulator, and the da of pairs j before the chunk
        tl.debug_barrier()  # the first loop's ddt stores are seen by every thread of the program (read back below)
        for i in range(0, heads_per_group):
            h = g * heads_per_group + i
            dy = tl.load(dy_seq + (h * sdy_h + t * sdy_l)[:, None] + offs_p[None, :] * sdy_p, mask=mqp,
                         other=0.0).to(DOT)
            dt = tl.load(dt_seq + h * sdt_h + t * sdt_l, mask=mq, other=0.0).to(tl.float32)
            A = tl.load(A_ptr + d * nheads + h).to(tl.float32)
            S = tl.load(st_seq + (h * sst_h + offs_p * sst_p)[:, None] + offs_n[None, :] * sst_n, mask=m_S,
                        other=0.0).to(DOT)
            da, dC = state_in_terms(dy, tl.cumsum(dt * (A * LOG2E), axis=0), S, Cm, dC,
                                    tl.load(cross_ptr + (s64 * nheads + h) * n_chunks + c), PREC, DOT)
            da = tl.where(mq, da, 0.0)
            tl.atomic_add(dA_ptr + d * nheads + h, tl.sum(da * dt, axis=0))
            ddt_h = ddt_ptr + s64 * sdt_s + h * sdt_h + t * sdt_l
            tl.store(ddt_h, tl.load(ddt_h, mask=mq, other=0.0) + da * A, mask=mq)
    Gd = Gd_sum.to(DOT)
    if STATES:
        dB = tl.dot(tl.trans(Gd), Cm, dB, input_precision=PREC)  # (Q, N)
        dC = tl.dot(Gd, Bm, dC, input_precision=PREC)
    else:
        dB = tl.dot(tl.trans(Gd), Cm, input_precision=PREC)
        dC = tl.dot(Gd, Bm, input_precision=PREC)
    tl.store(dB_ptr + s64 * sdb_s + g * sdb_g + t[:, None] * sdb_l + offs_n[None, :] * sdb_n,
             dB.to(dB_ptr.dtype.element_ty), mask=mqn)
    tl.store(dC_ptr + s64 * sdc_s + g * sdc_g + t[:, None] * sdc_l + offs_n[None, :] * sdc_n,
             dC.to(dC_ptr.dtype.element_ty), mask=mqn)
