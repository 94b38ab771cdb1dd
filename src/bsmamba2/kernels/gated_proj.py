"""The gated RMSNorm's numerator and the out-projection as one matrix product (Triton), for inference.

Per direction d and row r (a position of a sequence), with y the scan's output and z the gate:

    g = y · silu(z),   P[d, r] = g W_dᵀ,   ss[d, r] = Σ_k g_k²

The norm (RMSNormGated over all e channels) is out = g · rstd · w with rstd = rsqrt(ss / e + eps) a scalar per
row, so (g · rstd · w) W_outᵀ = rstd · (g (W_out · diag(w))ᵀ): the product runs on g with the norm gains folded
into W_d, and the caller applies rstd afterwards (`residual.gated_merge_into`). g is formed tile by tile as the
product's left operand and never goes to memory: this removes the separate gated-norm pass, which read y and z
and wrote the normalized tensor. Plain twin: `gated_proj_reference`.

Σ g² is a second product beside the first, (g ∘ g) times a column of ones (`ssd_common.ones_column`): every use of g is
then a product operand, in a layout the product can take straight from shared memory. The intermediate IR reads y
and z once per operand layout of the two products, but those layouts hold the same elements in the same registers,
and the generated code reads y and z and evaluates silu once per element (16 tanh per thread and step, as many as
without the second product). Summed on the vector units instead, Σ g² needed g in a layout of its own, one
conversion through shared memory per step (with 6-way bank conflicts on its stores), which measured slower. In
16-bit the squares are rounded to the operand's dtype before the sum (~2⁻⁹ relative each; Σ g² to ~2e-4, its rsqrt
to half that, below the output's rounding). float16 squares them in bf16: in float16 any |g| above 256 overflowed
the sum.

The kernel is bound by latency at low occupancy (225 registers and 91 KB of shared memory per program at the paper's
size, so 2 programs of 4 warps per SM). A 128-wide column block, which forms g once per column block, and register
caps that fit 3 programs per SM (spills, fewer stages) both measured slower.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from bsmamba2 import switches
from bsmamba2.kernels.conv import fast_silu, silu
from bsmamba2.kernels.ssd_common import dot_dtype, dot_precision, ones_column


@triton.jit
def _gated_proj_kernel(
    y_ptr, z_ptr, w_ptr, p_ptr, ss_ptr, R, E, N,
    sy_d, sy_r, sz_d, sz_r, sw_d, sw_k, sw_n, sp_d, sp_r,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    FAST_SILU: tl.constexpr, DOT: tl.constexpr, SQ: tl.constexpr, PREC: tl.constexpr,
):
    """One program: BLOCK_M rows of direction d (program axis 2) against BLOCK_N output columns (axis 1), the
    reduction over e in steps of BLOCK_K (EVEN_K: e is a multiple of it, no mask along e). The first column block
    also writes ss (2, R) float32. The model's d = 256 is one column block, so g is formed once per row."""
    d = tl.program_id(2)
    pid_n = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mr = rows < R
    r64 = rows.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < N
    y_rows = y_ptr + d * sy_d + r64[:, None] * sy_r + offs_k[None, :]
    z_rows = z_ptr + d * sz_d + r64[:, None] * sz_r + offs_k[None, :]
    w_cols = w_ptr + d * sw_d + offs_k[:, None] * sw_k + offs_n[None, :] * sw_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ss = tl.zeros((BLOCK_M, 16), dtype=tl.float32)  # column 0: Σ g² so far (see the module docstring)
    e0 = ones_column(offs_k, SQ)  # (BLOCK_K, 16)
    for k0 in range(0, E, BLOCK_K):
        if EVEN_K:
            mk = mr[:, None]
            mw = mn[None, :]
        else:
            mk = mr[:, None] & (k0 + offs_k < E)[None, :]
            mw = (k0 + offs_k < E)[:, None] & mn[None, :]
        y = tl.load(y_rows + k0, mask=mk, other=0.0).to(tl.float32)
        z = tl.load(z_rows + k0, mask=mk, other=0.0).to(tl.float32)
        g = y * silu(z, FAST_SILU)
        ss = tl.dot((g * g).to(SQ), e0, ss, input_precision=PREC)
        w = tl.load(w_cols + k0 * sw_k, mask=mw, other=0.0)
        acc = tl.dot(g.to(DOT), w.to(DOT), acc, input_precision=PREC)
    tl.store(p_ptr + d * sp_d + r64[:, None] * sp_r + offs_n[None, :], acc.to(p_ptr.dtype.element_ty),
             mask=mr[:, None] & mn[None, :])
    if pid_n == 0:
        tl.store(ss_ptr + d * R + r64, tl.sum(ss, axis=1), mask=mr)


# tuned at the paper's size (397,296 rows, e = 1024, d = 256) against 128 rows on 8 warps, 3 and 5 stages and
# BLOCK_K 64 (results: benchmarks/RESULTS.md; history: docs/perf-log.md)
_TILE = dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=32, num_warps=4, num_stages=4)


def _tile(e: int, n: int) -> dict:
    """Tile sizes and launch settings (BSMAMBA2_GP_<name> overrides them, for measurement)."""
    tile = {k: switches.gated_proj_setting(k, v) for k, v in _TILE.items()}
    tile["BLOCK_N"] = min(tile["BLOCK_N"], max(16, triton.next_power_of_2(n)))
    tile["BLOCK_K"] = min(tile["BLOCK_K"], max(16, triton.next_power_of_2(e)))
    return tile


def gated_proj(y: Tensor, z: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """y, z (2, R, e) (unit stride along e; any row and direction strides), w (2, e, n) →
    (P (2, R, n) in y's dtype, ss (2, R) float32), as in the module docstring."""
    two, R, e = y.shape
    n = w.shape[-1]
    if two != 2 or z.shape != y.shape or w.shape[:2] != (2, e) or y.stride(-1) != 1 or z.stride(-1) != 1:
        raise ValueError(f"gated_proj shapes disagree: y {tuple(y.shape)}, z {tuple(z.shape)}, w {tuple(w.shape)}")
    p = torch.empty(2, R, n, device=y.device, dtype=y.dtype)
    ss = torch.empty(2, R, device=y.device, dtype=torch.float32)
    tile = _tile(e, n)
    dot = dot_dtype(y)
    if R:
        _gated_proj_kernel[(triton.cdiv(R, tile["BLOCK_M"]), triton.cdiv(n, tile["BLOCK_N"]), 2)](
            y, z, w, p, ss, R, e, n, y.stride(0), y.stride(1), z.stride(0), z.stride(1), *w.stride(), p.stride(0),
            p.stride(1), EVEN_K=e % tile["BLOCK_K"] == 0, FAST_SILU=fast_silu(y.dtype), DOT=dot,
            SQ=tl.bfloat16 if dot == tl.float16 else dot, PREC=dot_precision(y), **tile)
    return p, ss


def gated_proj_reference(y: Tensor, z: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Plain twin of `gated_proj`, in float32."""
    g = y.float() * torch.nn.functional.silu(z.float())
    return torch.bmm(g, w.float()).to(y.dtype), g.pow(2).sum(-1)
