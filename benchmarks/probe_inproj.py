"""Probe (device): three ways to stop the time-axis in-projection's output going through memory, each against the
committed path at the paper's size (batch 8 × 8 s: 397,296 rows, d = 256, e = 1024, c = 1280, bf16).

`conv`  the conv1d + SiLU in the in-projection's epilogue: xbc (2, M, c) = silu(conv1d(xn W_xBCᵀ)) for both
        directions, against cuBLAS (N = 2·(e + c + h) = 4640) + `conv_silu_fwd`. Row tiles overlap by k − 1 rows
        (direction 0 needs the rows before, direction 1 the rows after); the row shifts are made either
          dot      as products with 0/1 shift matrices (exact: one non-zero per row), or
          scratch  through a per-program scratch tile of persistent programs, written, then read back shifted.
`gate`  the gate z recomputed inside the out-projection (z = xn W_zᵀ per K-step, xn's tile held), so the
        in-projection writes no z (N = 2592), against the in-projection N = 4640 + `gated_proj` reading z.
        Also the band axis's in-projection: two products of one direction each (committed) against one of both.
`gemm`  a plain persistent TMA GEMM of the whole in-projection against cuBLAS (what a Triton GEMM does here).

Every variant is checked against the committed path (relative error) before it is timed. Results: RESULTS.md,
"Fourteenth round". Run on the device: `PYTHONPATH=src python3 benchmarks/probe_inproj.py conv gate gemm`.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from bsmamba2.kernels.conv import conv_silu_fwd, fast_silu, silu
from bsmamba2.kernels.gated_proj import gated_proj
from bsmamba2.kernels.ssd_common import ones_column


@triton.jit
def _tile_rows(pid_m, d, M, KC: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows computed by a tile (overlapping by KC − 1: direction 0 needs the rows before, 1 the rows after), which
    exist, and which the tile stores."""
    j = tl.arange(0, BLOCK_M)
    r0 = pid_m * (BLOCK_M - (KC - 1)) - (KC - 1) * (1 - d)
    rows = r0 + j
    ok = (rows >= 0) & (rows < M)
    store = ok & tl.where(d == 0, j >= KC - 1, j < BLOCK_M - (KC - 1))
    return j, rows, ok, store


@triton.jit
def _pre_tile(a_ptr, w_ptr, rows, ok, offs_n, mn, d, Kd, sa_m, sw_d, sw_c, BLOCK_K: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * sa_m + offs_k[None, :]
    w_ptrs = w_ptr + d * sw_d + offs_n[None, :] * sw_c + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Kd, BLOCK_K):
        a = tl.load(a_ptrs + k0, mask=ok[:, None], other=0.0)
        w = tl.load(w_ptrs + k0, mask=mn[None, :], other=0.0)
        acc = tl.dot(a, w, acc)
    return acc


@triton.jit
def _inproj_conv_dot_kernel(a_ptr, w_ptr, cw_ptr, cb_ptr, out_ptr, M, L, CH, Kd,
                            sa_m, sw_d, sw_c, scw_d, scw_c, scw_k, so_d, so_m,
                            KC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            FAST_SILU: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    d = tl.program_id(2)
    j, rows, ok, store = _tile_rows(pid_m, d, M, KC, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < CH
    pre = _pre_tile(a_ptr, w_ptr, rows, ok, offs_n, mn, d, Kd, sa_m, sw_d, sw_c, BLOCK_K, BLOCK_M,
                    BLOCK_N).to(a_ptr.dtype.element_ty)
    t = rows % L
    out = tl.load(cb_ptr + d * CH + offs_n, mask=mn, other=0.0).to(tl.float32)[None, :] + tl.zeros(
        (BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in tl.static_range(KC):
        s = KC - 1 - i  # tap i multiplies raw[t − s] (direction 0) or raw[t + s] (direction 1)
        wi = tl.load(cw_ptr + d * scw_d + offs_n * scw_c + i * scw_k, mask=mn, other=0.0).to(tl.float32)
        if s == 0:
            y = pre.to(tl.float32)
        else:
            src = tl.where(d == 0, j - s, j + s)
            valid = tl.where(d == 0, t >= s, t + s < L)
            S = ((j[None, :] == src[:, None]) & valid[:, None]).to(pre.dtype)
            y = tl.dot(S, pre)
        out += wi[None, :] * y
    act = silu(out, FAST_SILU)
    tl.store(out_ptr + d * so_d + rows.to(tl.int64)[:, None] * so_m + offs_n[None, :],
             act.to(out_ptr.dtype.element_ty), mask=store[:, None] & mn[None, :])


@triton.jit
def _inproj_conv_scratch_kernel(a_ptr, w_ptr, cw_ptr, cb_ptr, out_ptr, scr_ptr, M, L, CH, Kd, n_m, n_n,
                                sa_m, sw_d, sw_c, scw_d, scw_c, scw_k, so_d, so_m,
                                KC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr, FAST_SILU: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    jn = tl.arange(0, BLOCK_N)
    scr = scr_ptr + pid.to(tl.int64) * (BLOCK_M * BLOCK_N)
    for tile in range(pid, n_m * n_n * 2, nprog):
        d = tile // (n_m * n_n)
        rem = tile % (n_m * n_n)
        pid_m = rem // n_n
        pid_n = rem % n_n
        j, rows, ok, store = _tile_rows(pid_m, d, M, KC, BLOCK_M)
        offs_n = pid_n * BLOCK_N + jn
        mn = offs_n < CH
        pre = _pre_tile(a_ptr, w_ptr, rows, ok, offs_n, mn, d, Kd, sa_m, sw_d, sw_c, BLOCK_K, BLOCK_M, BLOCK_N)
        tl.store(scr + j[:, None] * BLOCK_N + jn[None, :], pre.to(scr_ptr.dtype.element_ty))
        tl.debug_barrier()
        t = rows % L
        out = tl.load(cb_ptr + d * CH + offs_n, mask=mn, other=0.0).to(tl.float32)[None, :] + tl.zeros(
            (BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in tl.static_range(KC):
            s = KC - 1 - i
            wi = tl.load(cw_ptr + d * scw_d + offs_n * scw_c + i * scw_k, mask=mn, other=0.0).to(tl.float32)
            src = tl.where(d == 0, j - s, j + s)
            valid = tl.where(d == 0, t >= s, t + s < L) & (src >= 0) & (src < BLOCK_M)
            y = tl.load(scr + src[:, None] * BLOCK_N + jn[None, :], mask=valid[:, None], other=0.0)
            out += wi[None, :] * y.to(tl.float32)
        act = silu(out, FAST_SILU)
        tl.store(out_ptr + d * so_d + rows.to(tl.int64)[:, None] * so_m + offs_n[None, :],
                 act.to(out_ptr.dtype.element_ty), mask=store[:, None] & mn[None, :])
        tl.debug_barrier()


def inproj_conv(xn, w_xbc, conv_w, conv_b, L, variant="dot", BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4,
                num_stages=3, progs=2):
    """xn (M, d), w_xbc (2, c, d), conv_w (2, c, k), conv_b (2, c) → xbc (2, M, c)."""
    M, Kd = xn.shape
    _, CH, _ = w_xbc.shape
    k = conv_w.shape[-1]
    out = torch.empty(2, M, CH, device=xn.device, dtype=xn.dtype)
    n_m = triton.cdiv(M, BLOCK_M - (k - 1))
    n_n = triton.cdiv(CH, BLOCK_N)
    common = dict(KC=k, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, FAST_SILU=fast_silu(xn.dtype),
                  num_warps=num_warps, num_stages=num_stages)
    strides = (xn.stride(0), w_xbc.stride(0), w_xbc.stride(1), *conv_w.stride(), out.stride(0), out.stride(1))
    if variant == "dot":
        _inproj_conv_dot_kernel[(n_m, n_n, 2)](xn, w_xbc, conv_w, conv_b, out, M, L, CH, Kd, *strides, **common)
    else:
        nsm = torch.cuda.get_device_properties(xn.device).multi_processor_count if xn.is_cuda else 4
        grid = min(nsm * progs, n_m * n_n * 2)
        scr = torch.empty(grid, BLOCK_M, BLOCK_N, device=xn.device, dtype=xn.dtype)
        _inproj_conv_scratch_kernel[(grid,)](xn, w_xbc, conv_w, conv_b, out, scr, M, L, CH, Kd, n_m, n_n, *strides,
                                             **common)
    return out


# ---- plain persistent TMA GEMM -------------------------------------------------------------------------------------
@triton.jit
def _mm_tma_kernel(a_desc, w_desc, c_desc, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, NUM_PROGS: tl.constexpr):
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(pid, n_m * n_n, NUM_PROGS, flatten=True):
        pid_m = tile // n_n
        pid_n = tile % n_n
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            w = w_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
            acc = tl.dot(a, w.T, acc)
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(c_desc.dtype))


def mm_tma(a, w, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3, progs=1):
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, K = a.shape
    N = w.shape[0]
    c = torch.empty(M, N, device=a.device, dtype=a.dtype)
    nsm = torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 4
    grid = min(nsm * progs, triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N))
    _mm_tma_kernel[(grid,)](TensorDescriptor.from_tensor(a, [BLOCK_M, BLOCK_K]),
                            TensorDescriptor.from_tensor(w, [BLOCK_N, BLOCK_K]),
                            TensorDescriptor.from_tensor(c, [BLOCK_M, BLOCK_N]), M, N, K, BLOCK_M=BLOCK_M,
                            BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, NUM_PROGS=grid, num_warps=num_warps,
                            num_stages=num_stages)
    return c



# ---- the gate recomputed inside the out-projection ------------------------------------------------------------
@triton.jit
def _gated_proj_z_kernel(
    y_ptr, x_ptr, wz_ptr, w_ptr, p_ptr, ss_ptr, R, E, N,
    sy_d, sy_r, sx_r, swz_d, swz_e, sw_d, sw_k, sw_n, sp_d, sp_r,
    KD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FAST_SILU: tl.constexpr, DOT: tl.constexpr,
):
    d = tl.program_id(2)
    pid_n = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mr = rows < R
    r64 = rows.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, KD)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < N
    xn = tl.load(x_ptr + r64[:, None] * sx_r + offs_d[None, :], mask=mr[:, None], other=0.0)  # (BM, KD), held
    y_rows = y_ptr + d * sy_d + r64[:, None] * sy_r + offs_k[None, :]
    wz_cols = wz_ptr + d * swz_d + offs_k[None, :] * swz_e + offs_d[:, None]  # (KD, BK): W_zᵀ tile
    w_cols = w_ptr + d * sw_d + offs_k[:, None] * sw_k + offs_n[None, :] * sw_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ss = tl.zeros((BLOCK_M, 16), dtype=tl.float32)
    e0 = ones_column(offs_k, DOT)
    for k0 in range(0, E, BLOCK_K):
        y = tl.load(y_rows + k0, mask=mr[:, None], other=0.0).to(tl.float32)
        z = tl.dot(xn, tl.load(wz_cols + k0 * swz_e)).to(DOT).to(tl.float32)  # the in-projection's rounding
        g = y * silu(z, FAST_SILU)
        ss = tl.dot((g * g).to(DOT), e0, ss)
        w = tl.load(w_cols + k0 * sw_k, mask=mn[None, :], other=0.0)
        acc = tl.dot(g.to(DOT), w.to(DOT), acc)
    tl.store(p_ptr + d * sp_d + r64[:, None] * sp_r + offs_n[None, :], acc.to(p_ptr.dtype.element_ty),
             mask=mr[:, None] & mn[None, :])
    if pid_n == 0:
        tl.store(ss_ptr + d * R + r64, tl.sum(ss, axis=1), mask=mr)


def gated_proj_z(y, xn, wz, w, BLOCK_M=64, BLOCK_N=256, BLOCK_K=32, num_warps=4, num_stages=3):
    """y (2, R, e), xn (R, kd), wz (2, e, kd), w (2, e, n) → (P (2, R, n), ss (2, R))."""
    two, R, e = y.shape
    n = w.shape[-1]
    kd = xn.shape[1]
    p = torch.empty(2, R, n, device=y.device, dtype=y.dtype)
    ss = torch.empty(2, R, device=y.device, dtype=torch.float32)
    dot = tl.float32 if y.dtype == torch.float32 else tl.bfloat16
    _gated_proj_z_kernel[(triton.cdiv(R, BLOCK_M), triton.cdiv(n, BLOCK_N), 2)](
        y, xn, wz, w, p, ss, R, e, n, y.stride(0), y.stride(1), xn.stride(0), wz.stride(0), wz.stride(1),
        *w.stride(), p.stride(0), p.stride(1), KD=kd, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        FAST_SILU=fast_silu(y.dtype), DOT=dot, num_warps=num_warps, num_stages=num_stages)
    return p, ss


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("probes", nargs="+", choices=["conv", "gate", "gemm"])
    ap.add_argument("--seqs", type=int, default=496, help="time-axis sequences (batch 8 x 62 bands)")
    ap.add_argument("--length", type=int, default=801, help="frames of an 8-s chunk")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    d, e, c, h, k = 256, 1024, 1280, 16, 4
    width = e + c + h
    M = args.seqs * args.length
    torch.manual_seed(0)
    xn = torch.randn(M, d, device=dev, dtype=dt)
    w_in = (torch.randn(2 * width, d, device=dev) / 16).to(dt)
    w3 = w_in.view(2, width, d)
    results = {}

    def bench(name, fn, check=None):
        """Median ms of fn (twice, to show the spread) and its relative error against check (a tuple)."""
        try:
            out = fn()
            err = [rel(o, r) for o, r in zip(out, check)] if check is not None else None
            ms = [triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") for _ in range(2)]
        except Exception as exc:  # a variant that does not compile is a result too
            print(f"{name:48s} FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            results[name] = {"error": str(exc)[:500]}
            return
        results[name] = {"ms": ms, "err": err}
        print(f"{name:48s} {ms[0]:7.3f} / {ms[1]:7.3f} ms   err {err}", flush=True)

    bench("cuBLAS in-projection N=4640", lambda: (F.linear(xn, w_in),))
    if "conv" in args.probes:
        conv_w = (torch.randn(2, c, k, device=dev) / 2).to(dt)
        conv_b = (torch.randn(2, c, device=dev) / 4).to(dt)
        w_xbc = w3[:, e:e + c].contiguous()

        def committed():
            zx = F.linear(xn, w_in).view(args.seqs, args.length, 2, width)
            return (conv_silu_fwd(zx[..., e:e + c], conv_w, conv_b).view(2, M, c),)

        ref = committed()
        bench("cuBLAS in-projection + conv (committed)", committed, ref)
        bench("cuBLAS xBC columns only N=2560", lambda: (F.linear(xn, w_xbc.view(-1, d)),))
        bench("cuBLAS z and dt columns only N=2080",
              lambda: (F.linear(xn, torch.cat([w3[:, :e], w3[:, e + c:]], 1).reshape(-1, d)),))
        for cfg in [(64, 128, 64, 4, 3), (64, 128, 64, 4, 4), (64, 256, 64, 8, 3), (128, 128, 64, 8, 3),
                    (64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (64, 128, 32, 4, 4)]:
            bench(f"conv epilogue, dot {cfg}",
                  lambda: (inproj_conv(xn, w_xbc, conv_w, conv_b, args.length, "dot", *cfg),), ref)
        for cfg in [(64, 128, 64, 4, 3, 2), (128, 128, 64, 8, 3, 1), (128, 64, 64, 4, 3, 2), (64, 256, 64, 8, 3, 1),
                    (128, 128, 64, 4, 3, 2)]:
            bench(f"conv epilogue, scratch {cfg}",
                  lambda: (inproj_conv(xn, w_xbc, conv_w, conv_b, args.length, "scratch", *cfg),), ref)
    if "gate" in args.probes:
        w_out = (torch.randn(2, e, d, device=dev) / 32).to(dt)
        y = torch.randn(2, M, e, device=dev, dtype=dt)
        z = F.linear(xn, w_in).view(M, 2, width)[..., :e].transpose(0, 1)
        ref = gated_proj(y, z, w_out)
        wz = w3[:, :e].contiguous()
        bench("cuBLAS in-projection without z N=2592", lambda: (F.linear(xn, w3[:, e:].reshape(-1, d)),))
        bench("gated_proj (committed, z read)", lambda: gated_proj(y, z, w_out), ref)
        for cfg in [(64, 256, 32, 4, 3), (64, 256, 32, 4, 2), (64, 256, 16, 4, 3), (128, 256, 32, 8, 2),
                    (64, 256, 64, 4, 2)]:
            bench(f"gated_proj, z recomputed {cfg}", lambda: gated_proj_z(y, xn, wz, w_out, *cfg), ref)
        zx2 = torch.empty(2, M, width, device=dev, dtype=dt)

        def two_products():
            for i in range(2):
                torch.mm(xn, w3[i].t(), out=zx2[i])
            return (zx2,)

        bench("band in-projection: two mm N=2320 (committed)", two_products)
    if "gemm" in args.probes:
        full = (F.linear(xn, w_in),)
        for cfg in [(128, 256, 64, 8, 3, 1), (128, 128, 64, 4, 4, 2), (128, 128, 64, 8, 3, 1), (64, 256, 64, 4, 4, 2),
                    (128, 128, 128, 8, 3, 1), (128, 128, 128, 4, 3, 1), (128, 256, 64, 8, 2, 1),
                    (256, 128, 64, 8, 3, 1), (128, 256, 64, 8, 4, 1)]:
            bench(f"TMA GEMM {cfg}", lambda: (mm_tma(xn, w_in, *cfg),), full)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
