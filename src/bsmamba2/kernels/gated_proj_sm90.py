"""`gated_proj` for Hopper GPUs (sm_90), in Gluon: P[d, r] = g W_dᵀ and ss[d, r] = Σ_k g_k² with g = y · silu(z),
the same function as `gated_proj._gated_proj_kernel` (plain twin: `gated_proj.gated_proj_reference`).

One program owns BM = 128 rows of one direction against all N output columns (the model's 256), two warpgroups of
64 rows each sharing every W tile. The reduction over e runs in steps of BK = 64:

    step k     y, z (BM, BK) and W (N, BK) tiles arrive by cp.async into a ring of STAGES stages, STAGES − 1 steps
               ahead; g = y · silu(z) is formed in registers, in the product's left-operand layout (so it never
               goes to shared memory), Σ g² is summed per row on the vector units, and the warpgroup MMA
               acc += g Wᵀ takes W straight from shared memory.

What differs from the Triton kernel, and why: the Triton kernel's 64-row programs each read all of W (512 KB per
direction) through L2 for 64 rows, and its pipeliner staged y and z through shared memory and back; here a W tile
serves 128 rows, g is formed from y and z read once from shared memory into the operand layout, and Σ g² is a
row sum instead of a second product.

For what the model runs: bf16 or fp16, N = 256 (the model dim), e a multiple of 64 and at least two steps of it
(e ≥ 128: a single-step loop does not compile), W with unit stride along e (the block's folded out-projection is
stored so), 16-byte aligned rows. `applies` says whether a call qualifies; `gated_proj` runs the Triton kernel
otherwise (and always with BSMAMBA2_GP_GLUON=0). BSMAMBA2_GP_SM90_STAGES sets the ring's depth (default 3).

Measured (H200, paper size, 397,296 rows × e = 1024, bf16; `benchmarks/ab_scan.py gated`): 1.48-1.51 ms per call
against the Triton kernel's 1.60-1.74 ms, Σ g² to 4e-7 of the float32 twin (Triton's: 2e-4, its squares rounded to
16 bits), the same output error (2.4e-3); in the model +0.8% audio-s/s in a same-process A/B. A persistent variant
(one program per SM looping over tiles) measured the same and was dropped; a 2-stage ring took 2.0 ms.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
from torch import Tensor

from bsmamba2.kernels.ssd_short_sm90 import copyable
from bsmamba2.kernels.ssd_sm90 import gluon_api, gluon_importable, gluon_silu

BM, BK, N_COLS = 128, 64, 256


def applies(y: Tensor, z: Tensor, w: Tensor) -> bool:
    """Whether this kernel computes the call (see the module docstring)."""
    if not (y.is_cuda and gluon_importable() and torch.cuda.get_device_capability(y.device)[0] == 9):
        return False
    return (y.dtype in (torch.bfloat16, torch.float16) and z.dtype == y.dtype and w.dtype == y.dtype
            and w.shape[-1] == N_COLS and y.shape[-1] % BK == 0 and y.shape[-1] >= 2 * BK and w.stride(1) == 1
            and copyable(y) and copyable(z) and w.data_ptr() % 16 == 0 and w.stride(0) % 16 == 0
            and w.stride(2) % 16 == 0)


def _stages() -> int:
    return int(os.environ.get("BSMAMBA2_GP_SM90_STAGES", "3"))


def _outstanding() -> int:
    return int(os.environ.get("BSMAMBA2_GP_SM90_OUTSTANDING", "1"))


@functools.cache
def _build():
    api = gluon_api()
    gluon, gl, async_copy, cp_async, barrier = api.gluon, api.gl, api.async_copy, api.cp_async, api.barrier
    fence_async_shared, warpgroup_mma, warpgroup_mma_wait = (api.fence_async_shared, api.warpgroup_mma,
                                                             api.warpgroup_mma_wait)
    silu = gluon_silu()

    @gluon.jit
    def _issue(y_ring, z_ring, w_ring, k, row0, d, y_ptr, z_ptr, w_ptr, R, sy_d, sy_r, sz_d, sz_r, sw_d, sw_n,
               ld: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr, N: gl.constexpr, STAGES: gl.constexpr):
        """cp.async of reduction step k into ring stage k % STAGES: y, z (BM, BK) tiles (rows past R read as
        zero) and W's (N, BK) tile; one commit group."""
        stage = k % STAGES
        rows = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, ld))
        cols = gl.expand_dims(k * BK + gl.arange(0, BK, layout=gl.SliceLayout(0, ld)), 0)
        ok = gl.expand_dims(rows < R, 1)
        r64 = gl.expand_dims(rows.to(gl.int64), 1)
        cp_async(y_ring.index(stage), y_ptr + d * sy_d + r64 * sy_r + cols, mask=ok)
        cp_async(z_ring.index(stage), z_ptr + d * sz_d + r64 * sz_r + cols, mask=ok)
        n = gl.expand_dims(gl.arange(0, N, layout=gl.SliceLayout(1, ld)).to(gl.int64), 1)
        cp_async(w_ring.index(stage), w_ptr + d * sw_d + n * sw_n + cols)  # W[d, k, n] at k + n·sw_n
        async_copy.commit_group()

    @gluon.jit
    def _gp_kernel(y_ptr, z_ptr, w_ptr, p_ptr, ss_ptr, R, sy_d, sy_r, sz_d, sz_r, sw_d, sw_n, sp_d, sp_r,
                   E: gl.constexpr, N: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                   OUTSTANDING: gl.constexpr, FAST: gl.constexpr, num_warps: gl.constexpr):
        """Program t: direction d = t % 2, rows row0 = (t // 2)·BM onwards."""
        t = gl.program_id(0)
        d = t % 2
        row0 = (t // 2) * BM
        dtype: gl.constexpr = y_ptr.dtype.element_ty
        STEPS: gl.constexpr = E // BK  # ≥ 2 (see `applies`)

        # Layouts. mma: the accumulator (BM, N), one 16-row slice per warp; dot_a: g as the product's left
        # operand; ld: cp.async pointer tiles (16 bytes per thread and copy); shared tiles NVMMA-swizzled.
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, N, 16])
        dot_a: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (BK // 8), BK // 8], [num_warps, 1], [1, 0])
        sl_a: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, BK], dtype)
        sl_w: gl.constexpr = gl.NVMMASharedLayout.get_default_for([N, BK], dtype)
        y_ring = gl.allocate_shared_memory(dtype, [STAGES, BM, BK], sl_a)
        z_ring = gl.allocate_shared_memory(dtype, [STAGES, BM, BK], sl_a)
        w_ring = gl.allocate_shared_memory(dtype, [STAGES, N, BK], sl_w)

        for k in gl.static_range(STAGES - 1):
            if k < STEPS:
                _issue(y_ring, z_ring, w_ring, k, row0, d, y_ptr, z_ptr, w_ptr, R, sy_d, sy_r, sz_d, sz_r, sw_d,
                       sw_n, ld, BM, BK, N, STAGES)
            else:
                async_copy.commit_group()
        acc = gl.zeros([BM, N], gl.float32, layout=mma)
        ss = gl.zeros([BM], gl.float32, layout=gl.SliceLayout(1, dot_a))
        g_prev = gl.zeros([BM, BK], dtype, layout=dot_a)  # the left operand of the product possibly still running
        for k in range(STEPS):
            stage = k % STAGES
            async_copy.wait_group(STAGES - 2)  # step k's group has landed (later ones may be in flight)
            barrier()
            yv = y_ring.index(stage).load(dot_a).to(gl.float32)
            zv = z_ring.index(stage).load(dot_a).to(gl.float32)
            g = yv * silu(zv, FAST)
            ss += gl.sum(g * g, axis=1)
            fence_async_shared()
            g16 = g.to(dtype)
            acc = warpgroup_mma(g16, w_ring.index(stage).permute((1, 0)), acc, is_async=True)
            # With OUTSTANDING = 1 step k's product runs on while step k + 1's g is formed; step k − 1's is done,
            # so its stage, (k − 1) % STAGES = (k + STAGES − 1) % STAGES, is the one refilled below. Its operand
            # g_prev is a dependence of this wait: its registers stay untouched until the product has read them.
            acc, g_prev = warpgroup_mma_wait(num_outstanding=OUTSTANDING, deps=(acc, g_prev))
            g_prev = g16
            barrier()  # every warp is done with the stage refilled next
            if k + STAGES - 1 < STEPS:
                _issue(y_ring, z_ring, w_ring, k + STAGES - 1, row0, d, y_ptr, z_ptr, w_ptr, R, sy_d, sy_r, sz_d,
                       sz_r, sw_d, sw_n, ld, BM, BK, N, STAGES)
            else:
                async_copy.commit_group()  # an empty group keeps wait_group's count uniform
        acc, g_prev = warpgroup_mma_wait(num_outstanding=0, deps=(acc, g_prev))
        rows = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
        cols = gl.arange(0, N, layout=gl.SliceLayout(0, mma))
        gl.store(p_ptr + d * sp_d + gl.expand_dims(rows.to(gl.int64) * sp_r, 1) + gl.expand_dims(cols, 0),
                 acc.to(p_ptr.dtype.element_ty), mask=gl.expand_dims(rows < R, 1))
        rows_s = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, dot_a))
        gl.store(ss_ptr + d * R + rows_s, ss, mask=rows_s < R)

    return _gp_kernel


def _kernel():
    return _build()


def gated_proj_sm90(y: Tensor, z: Tensor, w: Tensor, p: Tensor, ss: Tensor) -> None:
    """`gated_proj` into its outputs: y, z (2, R, e), w (2, e, N) with unit stride along e → p (2, R, N)
    contiguous, ss (2, R) float32 contiguous. Call only where `applies` is true."""
    two, R, e = y.shape
    n = w.shape[-1]
    grid = (2 * triton.cdiv(R, BM),)  # one program per (row block, direction)
    _kernel()[grid](y, z, w, p, ss, R, y.stride(0), y.stride(1), z.stride(0), z.stride(1), w.stride(0),
                    w.stride(2), p.stride(0), p.stride(1), E=e, N=n, BM=BM, BK=BK, STAGES=_stages(),
                    OUTSTANDING=_outstanding(), FAST=True,
                    num_warps=8)
