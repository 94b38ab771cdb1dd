"""The band-axis forward scan with every fused option (the band axis at inference) for Hopper GPUs (sm_90), in
Gluon: the same function as `ssd.ssd_fwd` with x_conv, bc_conv, dt_bias and z on sequences of at most Q = 64 steps
(elsewhere the Triton pair `ssd_band.band_cb_kernel` then `ssd_band.band_fwd_kernel`; plain twin: the block's
`kernels.block.mixer_core_reference`).

One program owns one sequence and walks its heads; all of it reads the raw in-projection in place:

    per group     Bc, Cc = silu(conv1d(B), conv1d(C))            (Q × N) each, into shared memory
                  G      = Cc Bcᵀ                                 kept in registers for the group's heads
    per head      xc     = silu(conv1d(x))                        from one shared copy of the head's raw x
                  P      = G ∘ exp2(cum_i − cum_j) ∘ dt_j  (j ≤ i), plus D on the diagonal
                  g      = (P xc) · silu(z),   Σ_p g²             the gated RMSNorm's numerator and statistics

What differs from the Triton pair, and why:
  * C Bᵀ stays on chip: the Triton pair writes it per (sequence, group) and reads it back per head (L2 traffic
    and a second launch).
  * x and z of the next head are copied into shared memory (`cp.async`) while this head computes. x is copied
    once and read back in a layout where each thread holds half a column, so the conv's row shifts are `gather`s
    within a thread (register moves and a few shuffles): a shared-memory view may not start at an arbitrary row,
    and the Triton kernel, loading four overlapping tiles per head from global memory, was bound by that traffic.
  * The steps softplus(dt + bias) and their cumulative log2-decays come from `ssd_time_sm90.chunk_steps`, so the
    head loop has no cross-thread scan.
  * D rides on P's diagonal (the product's right operand is xc itself), and g leaves through shared memory in
    16-byte row pieces.
  * The launch caps registers at 168 (BSMAMBA2_SSD_BAND_MAXNREG; 0: no cap), three programs per SM, with no
    spills in the head loop: uncapped (240 registers, two per SM) and at 128 (four per SM, spilling) it was
    slower.

For what the model runs on the fast path only: bf16 or fp16, headdim 64, d_state 64 or 128, conv width up to 4,
unit last-dim strides. `applies` says whether a call qualifies; `ssd.ssd_fwd` runs the Triton kernels otherwise.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from bsmamba2 import switches
from bsmamba2.kernels.ssd_common import direction
from bsmamba2.kernels.ssd_time_sm90 import chunk_steps, gluon_api, gluon_importable

Q = 64  # rows of every tile (the sequence, padded), and headdim


def applies(x: Tensor, B: Tensor, C: Tensor, z: Tensor, conv_width: int) -> bool:
    """Whether this kernel computes a fused band-axis call: a Hopper GPU (compute capability 9.x), Gluon
    importable, a sequence of at most Q steps, 16-bit inputs, headdim 64, d_state 64 or 128, a
    conv of at most 4 taps, unit last-dim strides, and x and z rows aligned for 16-byte copies."""
    if not (x.is_cuda and gluon_importable() and torch.cuda.get_device_capability(x.device)[0] == 9):
        return False
    n = B.shape[-1]
    return (x.shape[1] <= Q and x.dtype in (torch.bfloat16, torch.float16) and B.dtype == x.dtype
            and C.dtype == x.dtype and z.dtype == x.dtype and x.shape[-1] == Q and n in (Q, 2 * Q)
            and 1 <= conv_width <= 4 and x.stride(-1) == 1 and z.stride(-1) == 1
            and B.stride(-1) == 1 and C.stride(-1) == 1 and _copyable(x) and _copyable(z))


def _copyable(t: Tensor) -> bool:
    """Whether the kernel's 16-byte copies can read t's rows: its start and its strides 16-element aligned (Triton
    specializes such arguments; without that the copies cannot be vectorized and the kernel does not compile)."""
    return t.data_ptr() % 16 == 0 and all(st % 16 == 0 for st in t.stride()[:-1])


def _kernel():
    return _build()


MAXNREG = 168  # registers per thread: three programs of 4 warps per SM (65536 registers), no spills in the head loop


def _maxnreg() -> dict:
    """The launch's register cap: BSMAMBA2_SSD_BAND_MAXNREG, else MAXNREG (0: none)."""
    cap = switches.ssd_band_maxnreg(MAXNREG)
    return {"maxnreg": cap} if cap else {}


@functools.cache
def _build():
    api = gluon_api()
    gluon, gl, async_copy, cp_async, barrier = api.gluon, api.gl, api.async_copy, api.cp_async, api.barrier
    fence_async_shared, warpgroup_mma = api.fence_async_shared, api.warpgroup_mma
    direction_g = gluon.jit(direction.fn)  # `ssd_common`'s (scalar arithmetic only) as a Gluon function

    @gluon.jit
    def _silu(v, FAST: gl.constexpr):
        """v · sigmoid(v) in float32; FAST: v/2 · (1 + tanh(v/2)) with the hardware tanh, as `conv.silu`."""
        if FAST:
            th = gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [v * 0.5], dtype=gl.float32,
                                           is_pure=True, pack=1)
            return 0.5 * v * (1.0 + th)
        else:
            return v / (1.0 + gl.exp(-v))

    @gluon.jit
    def _issue_head(x_ring, z_bufs, stage, x_seq, z_seq, h, tau, L, reverse, cols, sx_l, sx_h, sz_l, sz_h):
        """cp.async of head h's raw x and z tiles (rows in scan order, zero past the end) into stage `stage` of
        x's ring and of the z tiles; one commit group. The head offset rides on the row offsets: offsets of the
        whole tile that do not depend on the head loop get hoisted out of it, a register per element."""
        t = gl.where(reverse, L - 1 - tau, tau)  # offsets within one sequence fit 32 bits
        ok = gl.expand_dims(tau < L, 1)
        cp_async(x_ring.index(stage), x_seq + gl.expand_dims(t * sx_l + h * sx_h, 1) + gl.expand_dims(cols, 0),
                 mask=ok)
        cp_async(z_bufs.index(stage), z_seq + gl.expand_dims(t * sz_l + h * sz_h, 1) + gl.expand_dims(cols, 0),
                 mask=ok)
        async_copy.commit_group()

    @gluon.jit
    def _conv_rows(raw_base, col0, w_ch, bias, rows_tau, L, reverse, s_l, cols, sw_k, K: gl.constexpr,
                   FAST: gl.constexpr):
        """silu(conv1d) of raw rows, (Q, cols) float32 in the layout of rows_tau / cols: out[τ] = silu(b + Σ_i
        w[i] · raw[τ − (K−1) + i]) in scan order, raw rows outside [0, L) zero (`conv.conv_silu_rows`). The tile
        starts col0 elements into each raw row (added to the row offsets: offsets of the whole tile that do not
        depend on the head loop get hoisted out of it, a register per element and tap). w_ch: the channels' tap-0
        weight pointers, the next taps sw_k apart; bias float32."""
        out = gl.expand_dims(bias, 0)
        for i in gl.static_range(K):
            tp = rows_tau - (K - 1) + i
            t = gl.where(reverse, L - 1 - tp, tp)  # offsets within one sequence fit 32 bits
            ok = gl.expand_dims((tp >= 0) & (tp < L), 1)
            raw = gl.load(raw_base + gl.expand_dims(t * s_l + col0, 1) + gl.expand_dims(cols, 0), mask=ok,
                          other=0.0)
            out = out + gl.expand_dims(gl.load(w_ch + i * sw_k).to(gl.float32), 0) * raw.to(gl.float32)
        return _silu(out, FAST)

    @gluon.jit
    def _band_kernel(x_ptr, z_ptr, B_ptr, C_ptr, st_ptr, cwx_ptr, cbx_ptr, cwbc_ptr, cbbc_ptr, D_ptr, y_ptr, ss_ptr,
                     L, nheads, seqs_per_dir, heads_per_group, ngroups, CHX, CHBC,
                     sx_s, sx_l, sx_h, sz_s, sz_l, sz_h, sb_s, sb_l, sb_g, sc_s, sc_l, sc_g,
                     sy_s, sy_l, sy_h, sss_s, sss_l, sss_h,
                     swx_d, swx_c, swx_k, swbc_d, swbc_c, swbc_k,
                     Q: gl.constexpr, N: gl.constexpr, K: gl.constexpr, DIR_MODE: gl.constexpr, HAS_D: gl.constexpr,
                     FAST: gl.constexpr, num_warps: gl.constexpr):
        s = gl.program_id(0)
        d, reverse = direction_g(s, seqs_per_dir, DIR_MODE)  # d: the weights', A's and D's row (0 unless DIR_MODE 2)
        s64 = s.to(gl.int64)
        dtype: gl.constexpr = x_ptr.dtype.element_ty

        # Layouts. mma: the warpgroup-MMA accumulator (64-column instructions) of the (Q, Q) and (Q, P) tiles;
        # dot_a: a product's left operand in registers; ld_p / ld_n: row-major tiles of P / N columns, 16 bytes
        # per thread and access; the shared tiles are NVMMA-swizzled for the MMAs.
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, 64, 16])
        dot_a: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        rows: gl.constexpr = gl.SliceLayout(1, mma)  # a vector along a tile's rows (index i)
        cols: gl.constexpr = gl.SliceLayout(0, mma)  # a vector along its columns (index j)
        ld_p: gl.constexpr = gl.BlockedLayout([1, 8], [256 // Q, Q // 8], [num_warps, 1], [1, 0])
        sl_p: gl.constexpr = gl.NVMMASharedLayout.get_default_for([Q, Q], dtype)

        # bufs: the group's B and C in column halves (tiles 0, 1: B; 2, 3: C) for C Bᵀ, then the z ring (0, 1);
        # x_ring: unswizzled, read column by column into col_l
        bufs = gl.allocate_shared_memory(dtype, [4, Q, Q], sl_p)
        x_ring = gl.allocate_shared_memory(dtype, [2, Q, Q], gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
        xc_s = gl.allocate_shared_memory(dtype, [Q, Q], sl_p)  # xc, the product's right operand; then g
        # col_l: each thread holds Q/2 consecutive rows of one column, so the conv's row shifts (`gather` along
        # rows) are register moves and a few shuffles between the column's two lanes
        col_l: gl.constexpr = gl.BlockedLayout([Q // 2, 1], [2, 16], [1, num_warps], [0, 1])
        r_c = gl.arange(0, Q, layout=gl.SliceLayout(1, col_l))
        cols_c = gl.arange(0, Q, layout=gl.SliceLayout(0, col_l))

        # rows in scan order, in the ld_p layout (copies, conv, g's store) and in the accumulator's (Σ g²)
        tau_p = gl.arange(0, Q, layout=gl.SliceLayout(1, ld_p))
        ok_p = tau_p < L
        t_p = gl.where(reverse, L - 1 - tau_p, tau_p)  # offsets within one sequence fit 32 bits
        cols_p = gl.arange(0, Q, layout=gl.SliceLayout(0, ld_p))
        offs_i = gl.arange(0, Q, layout=rows)
        offs_j = gl.arange(0, Q, layout=cols)
        t_i = gl.where(reverse, L - 1 - offs_i, offs_i)

        x_seq = x_ptr + s64 * sx_s
        z_seq = z_ptr + s64 * sz_s
        G = gl.zeros([Q, Q], gl.float32, layout=mma)
        for grp in range(ngroups):
            # C Bᵀ of the group, from the conv of its raw B and C (channels: the conv's last 2·groups·N are B's
            # then C's)
            w_d = cwbc_ptr + d * swbc_d
            for half in gl.static_range(N // Q):  # tiles 0, 1: B's columns; 2, 3: C's
                ch_b = (CHBC - 2 * ngroups * N) + grp * N + half * Q + cols_p
                ch_c = ch_b + ngroups * N
                Bc = _conv_rows(B_ptr + s64 * sb_s, grp * sb_g + half * Q, w_d + ch_b * swbc_c,
                                gl.load(cbbc_ptr + d * CHBC + ch_b).to(gl.float32), tau_p, L, reverse, sb_l, cols_p,
                                swbc_k, K, FAST)
                bufs.index(half).store(Bc.to(dtype))
                Cc = _conv_rows(C_ptr + s64 * sc_s, grp * sc_g + half * Q, w_d + ch_c * swbc_c,
                                gl.load(cbbc_ptr + d * CHBC + ch_c).to(gl.float32), tau_p, L, reverse, sc_l, cols_p,
                                swbc_k, K, FAST)
                bufs.index(2 + half).store(Cc.to(dtype))
            fence_async_shared()
            barrier()
            G = warpgroup_mma(bufs.index(2), bufs.index(0).permute((1, 0)), G, use_acc=False)
            if N // Q == 2:
                G = warpgroup_mma(bufs.index(3), bufs.index(1).permute((1, 0)), G)
            barrier()  # B and C read: their bytes take the first head's x
            h0 = grp * heads_per_group
            _issue_head(x_ring, bufs, h0 % 2, x_seq, z_seq, h0, tau_p, L, reverse, cols_p, sx_l, sx_h, sz_l, sz_h)

            for hl in range(heads_per_group):
                h = h0 + hl
                stage = h % 2
                steps = st_ptr + (s64 * nheads + h) * 2 * Q  # dt then cum, Q each
                dt_j = gl.load(steps + offs_j)
                cum_i = gl.load(steps + Q + offs_i)
                cum_j = gl.load(steps + Q + offs_j)
                if HAS_D:
                    Dh = gl.load(D_ptr + d * nheads + h)
                else:
                    Dh = 0.0
                ch_x = h * Q + cols_c
                w_x = cwx_ptr + d * swx_d + ch_x * swx_c
                acc = gl.expand_dims(gl.load(cbx_ptr + d * CHX + ch_x).to(gl.float32), 0)
                async_copy.wait_group(0)
                barrier()  # every thread's copies of this head have landed

                # xc = silu(conv1d(x)): tap i multiplies x shifted down by K − 1 − i rows (zero above the start)
                x_raw = x_ring.index(stage).load(col_l).to(gl.float32)
                for i in gl.static_range(K):
                    w = gl.expand_dims(gl.load(w_x + i * swx_k).to(gl.float32), 0)
                    if i == K - 1:
                        acc = acc + w * x_raw
                    else:
                        idx = gl.expand_dims(gl.maximum(r_c - (K - 1 - i), 0), 1) + gl.expand_dims(cols_c * 0, 0)
                        shifted = gl.where(gl.expand_dims(r_c >= K - 1 - i, 1), gl.gather(x_raw, idx, 0), 0.0)
                        acc = acc + w * shifted
                xc_s.store(_silu(acc, FAST).to(dtype))
                fence_async_shared()
                barrier()  # the taps are read (free for the next head) and xc_s is written
                if hl + 1 < heads_per_group:
                    _issue_head(x_ring, bufs, 1 - stage, x_seq, z_seq, h + 1, tau_p, L, reverse, cols_p, sx_l,
                                sx_h, sz_l, sz_h)

                # (the masks are formed here: held across the loop they took a register per element)
                Pm = gl.where(gl.expand_dims(offs_i, 1) >= gl.expand_dims(offs_j, 0), G * gl.exp2(gl.expand_dims(cum_i, 1) - gl.expand_dims(cum_j, 0))
                              * gl.expand_dims(dt_j, 0), 0.0)
                if HAS_D:
                    Pm = gl.where(gl.expand_dims(offs_i, 1) == gl.expand_dims(offs_j, 0), Pm + Dh, Pm)
                y = warpgroup_mma(gl.convert_layout(Pm.to(dtype), dot_a), xc_s,
                                  gl.zeros([Q, Q], gl.float32, layout=mma), use_acc=False)

                zt = bufs.index(stage).load(mma).to(gl.float32)
                g = y * _silu(zt, FAST)
                ss = gl.sum(g * g, axis=1)
                gl.store(ss_ptr + s64 * sss_s + t_i * sss_l + h * sss_h, ss, mask=offs_i < L)
                # g through shared memory (xc_s: the product has finished) and out in 16-byte row pieces
                xc_s.store(g.to(dtype))
                barrier()
                gl.store(y_ptr + s64 * sy_s + gl.expand_dims(t_p * sy_l + h * sy_h, 1) + gl.expand_dims(cols_p, 0),
                         xc_s.load(ld_p), mask=gl.expand_dims(ok_p, 1))
                barrier()  # every warp's reads of this stage and of xc_s are done before the next writes

    return _band_kernel


def band_fwd_sm90(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, dir_mode: int,
                  x_conv: tuple[Tensor, Tensor], bc_conv: tuple[Tensor, Tensor], dt_bias: Tensor, z: Tensor,
                  y: Tensor, ss: Tensor) -> None:
    """`ssd.ssd_fwd` with every fused option on band-axis sequences, into its outputs: x (s, l, h, p) raw, dt
    (s, l, h) raw, A/D (ndir, h) float32 contiguous, B/C (s, l, g, n) raw, z (s, l, h, p), conv weights (ndir, c, k)
    and biases (ndir, c), dt_bias (ndir, h) → y ← g = y · silu(z) (s, l, h, p), ss ← Σ_p g² (s, l, h) float32.
    Call only where `applies` is true, on a non-empty x."""
    s, l, h, p = x.shape
    ng, n = B.shape[2:]
    st = chunk_steps(dt, A, dir_mode, block_q=Q, dt_bias=dt_bias)  # (s, h, 1, 2, Q)
    (cwx, cbx), (cwbc, cbbc) = x_conv, bc_conv
    cbx, cbbc = cbx.contiguous(), cbbc.contiguous()
    _kernel()[(s,)](x, z, B, C, st, cwx, cbx, cwbc, cbbc, D if D is not None else A, y, ss,
                    l, h, s // 2 if dir_mode == 2 else s, h // ng, ng, cwx.shape[1], cwbc.shape[1],
                    x.stride(0), x.stride(1), x.stride(2), z.stride(0), z.stride(1), z.stride(2),
                    B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
                    y.stride(0), y.stride(1), y.stride(2), *ss.stride(), *cwx.stride(), *cwbc.stride(),
                    Q=Q, N=n, K=cwx.shape[-1], DIR_MODE=dir_mode, HAS_D=D is not None,
                    FAST=True, num_warps=4, **_maxnreg())  # 4 warps: one per 16 of the Q = 64 rows
