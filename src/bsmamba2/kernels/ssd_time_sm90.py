"""The time-axis forward scan for Hopper GPUs (sm_90), written in Gluon, Triton's explicit
dialect: the same function as `ssd_time.time_fwd_kernel` (plain twin: `bsmamba2.ssd.ssd_chunked`), with the buffers and
the order of the tensor-core work chosen by hand instead of by Triton's pipeliner.

Per (sequence, head) the program walks the chunks of Q = 64 steps in scan order, state S (d_state × headdim,
float32) in registers. With cum the chunk-local cumulative log2-decay (cum_i = Σ_{k≤i} dt_k·A·log2 e) and
last = cum_{Q−1}, chunk by chunk:

    P   = (C Bᵀ) ∘ exp2(cum_i − cum_j) ∘ dt_j  for j ≤ i (0 above the diagonal), plus D on the diagonal
    y   = exp2(cum_i) · (C S)_i + (P x)_i                  the state entering the chunk, then the chunk itself
    S  ← exp2(last) · S + Bᵀ (x ∘ dt_j exp2(last − cum_j))

What differs from the Triton kernel, and why:
  * x, B and C of the next chunk are copied into a two-stage ring of shared memory (`cp.async`) while this chunk
    computes; Triton's pipeliner staged B and C only, and staging x as well took it past two programs per SM.
  * The four products are asynchronous warpgroup MMAs issued back to back (C Bᵀ first, then C S and the state
    update, which need no result of this chunk), so the tensor cores run while the warps form P from C Bᵀ.
  * The decay arithmetic that has to scan along the chunk (cumsum, its total) comes precomputed from
    `chunk_steps` (a (sequence, head, chunk, {dt, cum}, Q) float32 tensor), so the
    loop has no cross-thread reductions.
  * The skip term D x rides on P's diagonal (x appears in column i of row i), so x needs no register copy but for
    the state update's operand x ∘ w, which goes to shared memory once.

Only for what the model runs on the fast path: bf16 or fp16, headdim 64, d_state a multiple of 16 up to 256,
x/B/C with unit stride in their last dim. `applies` says whether a call qualifies; `ssd.ssd_fwd` falls back to the
Triton kernel otherwise.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from bsmamba2.kernels.dt import softplus
from bsmamba2.kernels.ssd_common import LOG2E, chunk_rows, direction, head_bases

BLOCK_Q = 64  # chunk length; also the product tiles' N (headdim is 64)


@functools.cache
def gluon_importable() -> bool:
    try:
        from triton.experimental import gluon  # noqa: F401, PLC0415
        from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma  # noqa: F401, PLC0415
    except Exception:  # no Gluon in this Triton, or a broken install
        return False
    return True


def applies(x: Tensor, B: Tensor, C: Tensor, block_q: int = BLOCK_Q) -> bool:
    """Whether this kernel computes the call: a Hopper GPU (compute capability 9.x), Gluon importable, 16-bit
    inputs, headdim 64, d_state a multiple of 16 up to 256, unit last-dim strides, and the scan's chunk length
    (`ssd.block_q_for`) this kernel's."""
    if not (block_q == BLOCK_Q and x.is_cuda and gluon_importable() and torch.cuda.get_device_capability(x.device)[0] == 9):
        return False
    n = B.shape[-1]
    return (x.dtype in (torch.bfloat16, torch.float16) and B.dtype == x.dtype and C.dtype == x.dtype
            and x.shape[-1] == 64 and n % 16 == 0 and n <= 256
            and x.stride(-1) == 1 and B.stride(-1) == 1 and C.stride(-1) == 1)


@triton.jit
def _chunk_steps_kernel(dt_ptr, A_ptr, dtb_ptr, out_ptr, L, H, n_chunks, seqs_per_dir, sdt_s, sdt_l, sdt_h,
                        DIR_MODE: tl.constexpr, Q: tl.constexpr, BLOCK_H: tl.constexpr, SOFTPLUS: tl.constexpr):
    """One (sequence, chunk) per program, all heads: dt rows in scan order → out[s, :, c, 0, :] (the steps) and
    out[s, :, c, 1, :] (their cumulative log2-decay within the chunk). SOFTPLUS: dt is raw, the step is
    softplus(dt + dt bias)."""
    s = tl.program_id(0)
    c = tl.program_id(1)
    d, reverse = direction(s, seqs_per_dir, DIR_MODE)
    offs_q, mq, t = chunk_rows(c, L, reverse, Q)
    heads = tl.arange(0, BLOCK_H)
    mask = mq[:, None] & (heads < H)[None, :]
    dt = tl.load(dt_ptr + s.to(tl.int64) * sdt_s + t[:, None] * sdt_l + heads[None, :] * sdt_h, mask=mask,
                 other=0.0).to(tl.float32)  # (Q, heads)
    if SOFTPLUS:
        dtb = tl.load(dtb_ptr + d * H + heads, mask=heads < H, other=0.0)
        dt = tl.where(mask, softplus(dt + dtb[None, :]), 0.0)
    a2 = tl.load(A_ptr + d * H + heads, mask=heads < H, other=0.0) * LOG2E
    cum = tl.cumsum(dt * a2[None, :], axis=0)
    # out (s, h, chunks, 2, Q): q contiguous
    dst = out_ptr + ((s.to(tl.int64) * H + heads[None, :]) * n_chunks + c) * 2 * Q + offs_q[:, None]
    tl.store(dst, dt, mask=(heads < H)[None, :])  # rows past the end: dt 0, cum held
    tl.store(dst + Q, cum, mask=(heads < H)[None, :])


def chunk_steps(dt: Tensor, A: Tensor, dir_mode: int, block_q: int = BLOCK_Q, dt_bias: Tensor | None = None) -> Tensor:
    """The kernels' per-chunk decay inputs: dt (s, l, h) and A (ndir, h) → (s, h, chunks, 2, Q) float32,
    [..., 0, :] the steps dt in scan order (zero past the end), [..., 1, :] their chunk-local cumulative log2-decay
    cum_i = Σ_{k≤i} dt_k·A·log2(e). Scan order: sequences scanned from their end (dir_mode 1, or the second half
    for dir_mode 2) are read backwards. dt_bias (ndir, h): dt is raw and the step is softplus(dt + dt_bias). One
    Triton pass; its PyTorch twin is `chunk_steps_reference`."""
    s, l, h = dt.shape
    nc = triton.cdiv(l, block_q)
    out = torch.empty(s, h, nc, 2, block_q, device=dt.device, dtype=torch.float32)
    A = A.float().contiguous()
    dtb = A if dt_bias is None else dt_bias.float().contiguous()
    if s and l:
        _chunk_steps_kernel[(s, nc)](dt, A, dtb, out, l, h, nc, s // 2 if dir_mode == 2 else s,
                                     *dt.stride(), DIR_MODE=dir_mode, Q=block_q, BLOCK_H=triton.next_power_of_2(h),
                                     SOFTPLUS=dt_bias is not None)
    return out


def chunk_steps_reference(dt: Tensor, A: Tensor, dir_mode: int, block_q: int = BLOCK_Q,
                          dt_bias: Tensor | None = None) -> Tensor:
    """`chunk_steps` in PyTorch (its twin in the tests)."""
    s, l, h = dt.shape
    nc = -(-l // block_q)
    dt = dt.float()
    if dt_bias is not None:  # per direction: the first s // ndir sequences take row 0
        dt = F.softplus(dt + dt_bias.float().repeat_interleave(s // dt_bias.shape[0], dim=0)[:, None, :])
    if dir_mode == 1:
        dt = dt.flip(1)
    elif dir_mode == 2:
        dt = torch.cat([dt[: s // 2], dt[s // 2:].flip(1)])
    a_scale = (A.float() * LOG2E.value).repeat_interleave(s // A.shape[0], dim=0)  # (s, h): A·log2 e
    steps = F.pad(dt, (0, 0, 0, nc * block_q - l)).view(s, nc, block_q, h)  # (s, chunks, Q, h)
    cum = (steps * a_scale[:, None, None, :]).cumsum(2)
    return torch.stack([steps, cum], dim=3).permute(0, 4, 1, 3, 2).contiguous()  # (s, h, chunks, 2, Q)


def _kernel():
    """The Gluon kernel, built on first use (importing Gluon at module import would tie `bsmamba2.kernels` to a
    Triton with Gluon)."""
    return _build()


@functools.cache
def gluon_api() -> SimpleNamespace:
    """The Gluon names the Hopper kernels use, across Triton versions: `gluon`, `gl`, `async_copy`, `cp_async`
    (`async_copy_global_to_shared` in Triton 3.6, the GPU machines', `async_load` since: this machine's 3.9 compiles
    the kernels in the CPU tests), `barrier` (the CTA barrier: `thread_barrier`, renamed `barrier` likewise),
    `fence_async_shared`, `warpgroup_mma`, `warpgroup_mma_wait`. Imported on first use: importing Gluon at module
    import would tie `bsmamba2.kernels` to a Triton with Gluon."""
    from triton.experimental import gluon  # noqa: PLC0415
    from triton.experimental.gluon import language as gl  # noqa: PLC0415
    from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: PLC0415
        async_copy,
        fence_async_shared,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    return SimpleNamespace(gluon=gluon, gl=gl, async_copy=async_copy,
                           cp_async=getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared,
                           barrier=getattr(gl, "thread_barrier", None) or gl.barrier,
                           fence_async_shared=fence_async_shared, warpgroup_mma=warpgroup_mma,
                           warpgroup_mma_wait=warpgroup_mma_wait)


@functools.cache
def _build():
    api = gluon_api()
    gluon, gl, async_copy, cp_async, barrier = api.gluon, api.gl, api.async_copy, api.cp_async, api.barrier
    fence_async_shared, warpgroup_mma, warpgroup_mma_wait = (api.fence_async_shared, api.warpgroup_mma,
                                                             api.warpgroup_mma_wait)
    # `ssd_common`'s direction and pointer helpers (scalar arithmetic only) rebuilt as Gluon functions: a Gluon
    # kernel calls Gluon functions
    direction_g = gluon.jit(direction.fn)
    head_bases_g = gluon.jit(head_bases.fn)

    @gluon.jit
    def _issue_chunk(x_ring, b_ring, c_ring, stage, x_base, b_base, c_base, c, L, reverse,
                     sx_l, sb_l, sc_l, Q: gl.constexpr, P: gl.constexpr, N: gl.constexpr,
                     ld_p: gl.constexpr, ld_n: gl.constexpr):
        """cp.async of chunk c's x (Q, P), B and C (Q, N) tiles into ring stage `stage`, rows in scan order (memory
        row L−1−τ when scanned from the end), zero past the end; one commit group."""
        tau_p = c * Q + gl.arange(0, Q, layout=gl.SliceLayout(1, ld_p))
        t_p = gl.where(reverse, L - 1 - tau_p, tau_p)
        cols_p = gl.arange(0, P, layout=gl.SliceLayout(0, ld_p))
        x_ptrs = x_base + gl.expand_dims(t_p.to(gl.int64) * sx_l, 1) + gl.expand_dims(cols_p, 0)
        cp_async(x_ring.index(stage), x_ptrs, mask=gl.expand_dims(tau_p < L, 1))
        tau_n = c * Q + gl.arange(0, Q, layout=gl.SliceLayout(1, ld_n))
        t_n = gl.where(reverse, L - 1 - tau_n, tau_n).to(gl.int64)
        cols_n = gl.expand_dims(gl.arange(0, N, layout=gl.SliceLayout(0, ld_n)), 0)
        m_n = gl.expand_dims(tau_n < L, 1)
        cp_async(b_ring.index(stage), b_base + gl.expand_dims(t_n * sb_l, 1) + cols_n, mask=m_n)
        cp_async(c_ring.index(stage), c_base + gl.expand_dims(t_n * sc_l, 1) + cols_n, mask=m_n)
        async_copy.commit_group()

    @gluon.jit
    def _scan_kernel(x_ptr, B_ptr, C_ptr, st_ptr, D_ptr, y_ptr,
                     L, nheads, seqs_per_dir, heads_per_group, n_chunks,
                     sx_s, sx_l, sx_h, sb_s, sb_l, sb_g, sc_s, sc_l, sc_g, sy_s, sy_l, sy_h,
                     P: gl.constexpr, N: gl.constexpr, Q: gl.constexpr, DIR_MODE: gl.constexpr,
                     HAS_D: gl.constexpr, num_warps: gl.constexpr):
        h = gl.program_id(0)  # heads of one sequence are neighbouring programs: B and C shared through L2
        s = gl.program_id(1)
        d, reverse = direction_g(s, seqs_per_dir, DIR_MODE)
        x_base, b_base, c_base, y_base = head_bases_g(x_ptr, B_ptr, C_ptr, y_ptr, s, h, heads_per_group, sx_s, sx_h,
                                                      sb_s, sb_g, sc_s, sc_g, sy_s, sy_h)
        st_base = st_ptr + (s.to(gl.int64) * nheads + h) * n_chunks * 2 * Q
        dtype: gl.constexpr = x_ptr.dtype.element_ty

        # Layouts. mma: the warpgroup-MMA accumulator (64-column instructions) for the (Q, Q), (Q, P) and (N, P)
        # tiles; dot_a: a product's left operand held in registers; ld_*: the cp.async pointer tiles (16 bytes
        # per thread and copy); the shared tiles are NVMMA-swizzled for the MMAs.
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, 64, 16])
        dot_a: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        rows: gl.constexpr = gl.SliceLayout(1, mma)  # a vector along a tile's rows (index i)
        cols: gl.constexpr = gl.SliceLayout(0, mma)  # a vector along its columns (index j)
        ld_p: gl.constexpr = gl.BlockedLayout([1, 8], [256 // P, P // 8], [num_warps, 1], [1, 0])
        ld_n: gl.constexpr = gl.BlockedLayout([1, 8], [256 // N, N // 8], [num_warps, 1], [1, 0])
        sl_p: gl.constexpr = gl.NVMMASharedLayout.get_default_for([Q, P], dtype)
        sl_n: gl.constexpr = gl.NVMMASharedLayout.get_default_for([Q, N], dtype)
        sl_s: gl.constexpr = gl.NVMMASharedLayout.get_default_for([N, P], dtype)

        x_ring = gl.allocate_shared_memory(dtype, [2, Q, P], sl_p)
        b_ring = gl.allocate_shared_memory(dtype, [2, Q, N], sl_n)
        c_ring = gl.allocate_shared_memory(dtype, [2, Q, N], sl_n)
        xw_s = gl.allocate_shared_memory(dtype, [Q, P], sl_p)  # the state update's right operand x ∘ w
        s_s = gl.allocate_shared_memory(dtype, [N, P], sl_s)  # the state entering the chunk, for C S

        if HAS_D:
            Dh = gl.load(D_ptr + d * nheads + h)
        else:
            Dh = 0.0
        offs_i = gl.arange(0, Q, layout=rows)
        offs_j = gl.arange(0, Q, layout=cols)
        causal = gl.expand_dims(offs_i, 1) >= gl.expand_dims(offs_j, 0)
        diag = gl.expand_dims(offs_i, 1) == gl.expand_dims(offs_j, 0)

        state = gl.zeros([N, P], gl.float32, layout=mma)
        s_s.store(state.to(dtype))
        _issue_chunk(x_ring, b_ring, c_ring, 0, x_base, b_base, c_base, 0, L, reverse, sx_l, sb_l, sc_l,
                     Q, P, N, ld_p, ld_n)
        for c in range(n_chunks):
            stage = c % 2
            # the next chunk's tiles into the other stage (its last readers finished in the previous iteration)
            if c + 1 < n_chunks:
                _issue_chunk(x_ring, b_ring, c_ring, 1 - stage, x_base, b_base, c_base, c + 1, L, reverse,
                             sx_l, sb_l, sc_l, Q, P, N, ld_p, ld_n)
                async_copy.wait_group(1)
            else:
                async_copy.wait_group(0)
            x_t = x_ring.index(stage)
            b_t = b_ring.index(stage)
            c_t = c_ring.index(stage)
            chunk = st_base + c * 2 * Q
            dt_i = gl.load(chunk + offs_i)
            cum_i = gl.load(chunk + Q + offs_i)
            dt_j = gl.load(chunk + offs_j)
            cum_j = gl.load(chunk + Q + offs_j)
            last = gl.load(chunk + 2 * Q - 1)
            fence_async_shared()
            barrier()

            # tensor-core work that needs nothing of this chunk's arithmetic: C Bᵀ, then C S (S from the
            # previous chunk, in shared memory)
            G = warpgroup_mma(c_t, b_t.permute((1, 0)), gl.zeros([Q, Q], gl.float32, layout=mma),
                              use_acc=False, is_async=True)
            yi = warpgroup_mma(c_t, s_s, gl.zeros([Q, P], gl.float32, layout=mma), use_acc=False, is_async=True)

            # x ∘ w for the state update: w_j = dt_j · exp2(last − cum_j)
            x_r = x_t.load(mma).to(gl.float32)
            w = dt_i * gl.exp2(last - cum_i)
            xw_s.store((x_r * gl.expand_dims(w, 1)).to(dtype))
            fence_async_shared()
            barrier()
            state = warpgroup_mma(b_t.permute((1, 0)), xw_s, state * gl.exp2(last), is_async=True)

            # P from C Bᵀ while C S and the state update run
            G = warpgroup_mma_wait(num_outstanding=2, deps=(G,))
            Pm = gl.where(causal, G * gl.exp2(gl.expand_dims(cum_i, 1) - gl.expand_dims(cum_j, 0))
                          * gl.expand_dims(dt_j, 0), 0.0)
            if HAS_D:
                Pm = gl.where(diag, Pm + Dh, Pm)
            yi, state = warpgroup_mma_wait(num_outstanding=0, deps=(yi, state))
            y = yi * gl.expand_dims(gl.exp2(cum_i), 1)
            y = warpgroup_mma(gl.convert_layout(Pm.to(dtype), dot_a), x_t, y)

            # the state for the next chunk's C S (its reader, this chunk's C S, has finished)
            s_s.store(state.to(dtype))
            # y through shared memory (xw_s is free: the state update has finished) and out in 16-byte row
            # pieces: stored from the accumulator's layout (4-byte pieces) the call was slower
            xw_s.store(y.to(dtype))
            barrier()
            tau_p = c * Q + gl.arange(0, Q, layout=gl.SliceLayout(1, ld_p))
            t_p = gl.where(reverse, L - 1 - tau_p, tau_p).to(gl.int64)
            cols_p = gl.arange(0, P, layout=gl.SliceLayout(0, ld_p))
            gl.store(y_base + gl.expand_dims(t_p * sy_l, 1) + gl.expand_dims(cols_p, 0), xw_s.load(ld_p),
                     mask=gl.expand_dims(tau_p < L, 1))
            barrier()  # every warp's reads of this stage (and of xw_s) are done before the next writes into them

    return _scan_kernel


def time_fwd_sm90(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, dir_mode: int,
                  out: Tensor | None = None, num_warps: int = 4) -> Tensor:
    """Forward scan as `ssd.ssd_fwd` for time-axis sequences: x (s, l, h, p), dt (s, l, h), A/D (ndir, h) float32
    contiguous, B/C (s, l, g, n) → y (s, l, h, p) (or written into `out`, shaped like x, any strides with a unit
    last one). Call only where `applies` is true."""
    s, l, h, p = x.shape
    g, n = B.shape[2:]
    y = torch.empty(s, l, h, p, device=x.device, dtype=x.dtype) if out is None else out
    if s == 0 or l == 0:
        return y
    st = chunk_steps(dt, A, dir_mode)  # (s, h, chunks, 2, Q)
    seqs_per_dir = s // 2 if dir_mode == 2 else s
    _kernel()[(h, s)](x, B, C, st, D if D is not None else A, y,
                      l, h, seqs_per_dir, h // g, st.shape[2],
                      x.stride(0), x.stride(1), x.stride(2), B.stride(0), B.stride(1), B.stride(2),
                      C.stride(0), C.stride(1), C.stride(2), y.stride(0), y.stride(1), y.stride(2),
                      P=p, N=n, Q=BLOCK_Q, DIR_MODE=dir_mode, HAS_D=D is not None, num_warps=num_warps)
    return y
