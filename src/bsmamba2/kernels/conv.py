"""Depthwise conv1d + SiLU of both directions of a bidirectional Mamba2 block, as Triton kernels (forward, backward).

Plain twin: `Mamba2.forward`'s `F.silu(conv1d(xBC)[..., :l])` on the sequence (direction 0) and on the flipped
sequence, flipped back (direction 1). Without flips, direction 1 is the anti-causal conv with reversed taps:

    out[0, t] = silu(b₀ + Σ_i w₀[i] · raw[t − (k−1) + i, 0])      taps t−k+1 … t   (zeros before the start)
    out[1, t] = silu(b₁ + Σ_i w₁[i] · raw[t + (k−1) − i, 1])        taps t … t+k−1   (zeros after the end)

`raw` is read in place from the in-projection `(s, l, 2, c)` (any strides); the output is `(2, s, l, c)`, the layout
the scan reads as `(2s, l, ·)`. The forward walks each sequence in scan order with the last K−1 rows in registers
(each raw element loaded once) and the next four loaded ahead; with 16-bit outputs its SiLU uses the hardware tanh.
Backward saves only raw, weight, bias and runs two passes over (positions × channels) tiles: the first recomputes the
pre-activations from K shifted loads, writes dpre = dout · silu'(pre) into a `(2, s, l, c)` buffer in raw's dtype and
sums the weight and bias gradients per program in float32 (one atomic per element and program); the second gathers
draw[u] = Σ_i w[i] · dpre[t_i(u)] over the K output positions that read raw[u].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from bsmamba2.kernels import interpreting


@triton.jit
def silu(x, FAST: tl.constexpr):
    """x · sigmoid(x) in float32. FAST (16-bit outputs on the GPU): x/2 · (1 + tanh(x/2)) with the hardware tanh
    (~2⁻¹¹ relative, below a 16-bit output's rounding)."""
    if FAST:
        th = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x * 0.5], dtype=tl.float32,
                                       is_pure=True, pack=1)
        return 0.5 * x * (1.0 + th)
    else:
        return x * tl.sigmoid(x)


def fast_silu(dtype: torch.dtype) -> bool:
    """Whether kernels writing `dtype` take `silu`'s hardware-tanh form: 16-bit, and not in the CPU interpreter."""
    return dtype in (torch.bfloat16, torch.float16) and not interpreting()


@triton.jit
def conv_silu_rows(base, cols, tau, L, reverse, s_l, mask_c, w_ch, bias, K: tl.constexpr, FAST: tl.constexpr):
    """conv1d + SiLU of one sequence at the scan positions τ (rows) of a tile: out[τ] = silu(b + Σ_i w[i] ·
    raw[τ − (K−1) + i]) in scan order, raw row τ' at memory position τ' or L−1−τ' (reverse), zeros outside [0, L).
    base + cols: the raw channels of position 0; mask_c (cols,) those in range; w_ch (cols,): pointers to the
    channels' weights (K taps each, contiguous); bias (cols,) float32. float32 (rows, cols)."""
    out = bias[None, :]
    for i in tl.static_range(K):
        tp = tau - (K - 1) + i
        t = tl.where(reverse, L - 1 - tp, tp)
        ok = (tp >= 0) & (tp < L)
        raw = tl.load(base + t[:, None] * s_l + cols[None, :], mask=ok[:, None] & mask_c[None, :], other=0.0)
        out = out + tl.load(w_ch + i, mask=mask_c, other=0.0).to(tl.float32)[None, :] * raw.to(tl.float32)
    return silu(out, FAST)


@triton.jit
def _conv_raw_row(src, tau, L, d, sr_l, mc, zc):
    """Raw row τ (scan order) of a program's channels, float32; zeros past the end (zc: the channels' zero vector,
    so the position test is a vector: the interpreter takes no scalar mask)."""
    t = tl.where(d == 1, L - 1 - tau, tau)
    return tl.load(src + t * sr_l, mask=mc & (zc + tau < L), other=0.0).to(tl.float32)


@triton.jit
def _conv_fwd_kernel(
    raw_ptr, w_ptr, b_ptr, out_ptr, S, L, CH,
    sr_s, sr_l, sr_d, sr_c,
    so_d, so_s, so_l, so_c,
    K: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr, FAST_SILU: tl.constexpr,
):
    """One program walks one (sequence, direction) in scan order τ (t = τ, or L−1−τ for direction 1) over BLOCK_C
    channels, ROWS positions per unrolled step, carrying the last K−1 raw rows in registers: every raw element is
    loaded once, with one address per row instead of one per tile element and tap. In scan order both directions are
    the same causal sum: out[τ] = silu(b + Σ_i w[i] · raw[τ − (K−1) + i]).

    Rows τ … τ+4 are in registers (cur, ahead1 … ahead4) when row τ is computed, and row τ+5 is loaded before row τ
    is stored: the compiler cannot move a load above a store that might alias it, so with the loads in program
    order each warp had one row in flight (1.46–1.52 ms per call at the paper's size; 1.10–1.19 ms four rows ahead,
    which measured better than two, six or eight)."""
    pid_c = tl.program_id(0)
    pid_sd = tl.program_id(1)
    d = pid_sd // S
    s = pid_sd % S
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < CH
    zc = offs_c * 0
    wrow = w_ptr + (d * CH + offs_c) * K
    w0 = tl.load(wrow + 0, mask=mc, other=0.0).to(tl.float32)  # tap 0 multiplies raw[τ − (K−1)]
    if K > 1:
        w1 = tl.load(wrow + 1, mask=mc, other=0.0).to(tl.float32)
    if K > 2:
        w2 = tl.load(wrow + 2, mask=mc, other=0.0).to(tl.float32)
    if K > 3:
        w3 = tl.load(wrow + 3, mask=mc, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + d * CH + offs_c, mask=mc, other=0.0).to(tl.float32)
    src = raw_ptr + s.to(tl.int64) * sr_s + d * sr_d + offs_c * sr_c
    dst = out_ptr + d * so_d + s.to(tl.int64) * so_s + offs_c * so_c
    back1 = tl.zeros((BLOCK_C,), dtype=tl.float32)  # raw[τ − 1], raw[τ − 2], raw[τ − 3]: zeros before the start
    back2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    back3 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    cur = _conv_raw_row(src, 0, L, d, sr_l, mc, zc)
    ahead1 = _conv_raw_row(src, 1, L, d, sr_l, mc, zc)
    ahead2 = _conv_raw_row(src, 2, L, d, sr_l, mc, zc)
    ahead3 = _conv_raw_row(src, 3, L, d, sr_l, mc, zc)
    ahead4 = _conv_raw_row(src, 4, L, d, sr_l, mc, zc)
    for tau0 in range(0, L, ROWS):
        for r in tl.static_range(ROWS):
            tau = tau0 + r
            ahead5 = _conv_raw_row(src, tau + 5, L, d, sr_l, mc, zc)  # issued before this row's store
            if K == 1:
                pre = bias + w0 * cur
            elif K == 2:
                pre = bias + w0 * back1 + w1 * cur
            elif K == 3:
                pre = bias + w0 * back2 + w1 * back1 + w2 * cur
            else:
                pre = bias + w0 * back3 + w1 * back2 + w2 * back1 + w3 * cur
            act = silu(pre, FAST_SILU)
            t = tl.where(d == 1, L - 1 - tau, tau)
            tl.store(dst + t * so_l, act.to(out_ptr.dtype.element_ty), mask=mc & (zc + tau < L))
            back3 = back2
            back2 = back1
            back1 = cur
            cur = ahead1
            ahead1 = ahead2
            ahead2 = ahead3
            ahead3 = ahead4
            ahead4 = ahead5


@triton.jit
def _conv_dpre_kernel(
    raw_ptr, wt_ptr, b_ptr, dout_ptr, dpre_ptr, dw_ptr, db_ptr, S, L, CH,
    sr_s, sr_l, sr_d, sr_c,
    so_d, so_s, so_l, so_c,
    sp_d, sp_s, sp_l, sp_c,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, SEQS: tl.constexpr,
):
    """Backward, pass 1. One program: a (positions t × channels) tile of SEQS sequences of one direction. Per sequence
    it loads the K shifted raw tiles the forward loads, recomputes pre (BLOCK_T, BLOCK_C) and writes
    dpre = dout · silu'(pre) into dpre (2, s, l, c). The weight and bias gradients dw[i] = Σ_t dpre[t] · raw_i[t],
    db = Σ_t dpre[t] are summed elementwise over the SEQS sequences in float32 (BLOCK_T, BLOCK_C) registers, reduced
    over t once at the end and added with one atomic per element and program. wt is the weight as (2, K, c)."""
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_sd = tl.program_id(2)
    n_sblocks = tl.cdiv(S, SEQS)
    d = pid_sd // n_sblocks
    s0 = (pid_sd % n_sblocks) * SEQS
    sign = 1 - 2 * d  # +1: causal taps, −1: anti-causal taps
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # output positions t
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < CH
    wrow = wt_ptr + d * K * CH + offs_c  # tap i of the channels at wrow + i·CH
    # tap i of out[t] reads raw[t + sign·(i − (K−1))]; the shifted positions and their masks (BLOCK_T,)
    src0 = offs_t + sign * (0 - (K - 1))
    src1 = offs_t + sign * (1 - (K - 1))
    src2 = offs_t + sign * (2 - (K - 1))
    src3 = offs_t + sign * (3 - (K - 1))
    m0 = (src0 >= 0) & (src0 < L)
    m1 = (src1 >= 0) & (src1 < L)
    m2 = (src2 >= 0) & (src2 < L)
    m3 = (src3 >= 0) & (src3 < L)
    mt = (offs_t < L)[:, None] & mc[None, :]
    # per-element partial sums (BLOCK_T, BLOCK_C) of the weight and bias gradients; reduced over t after the loop
    acc0 = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    accb = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for si in tl.range(0, tl.minimum(SEQS, S - s0), loop_unroll_factor=1):
        s = s0 + si
        # the weights are reloaded (cache hits) per sequence: held across the loop they cost ~30 registers
        bias = tl.load(b_ptr + d * CH + offs_c, mask=mc, other=0.0).to(tl.float32)  # (BLOCK_C,)
        rc = raw_ptr + s.to(tl.int64) * sr_s + d * sr_d + offs_c[None, :] * sr_c
        # raw_i (BLOCK_T, BLOCK_C) = raw[t + sign·(i − (K−1))], zeros outside [0, L)
        x0 = tl.load(rc + src0[:, None] * sr_l, mask=m0[:, None] & mc[None, :], other=0.0).to(tl.float32)
        pre = bias[None, :] + x0 * tl.load(wrow, mask=mc, other=0.0).to(tl.float32)[None, :]
        if K > 1:
            x1 = tl.load(rc + src1[:, None] * sr_l, mask=m1[:, None] & mc[None, :], other=0.0).to(tl.float32)
            pre += x1 * tl.load(wrow + CH, mask=mc, other=0.0).to(tl.float32)[None, :]
        if K > 2:
            x2 = tl.load(rc + src2[:, None] * sr_l, mask=m2[:, None] & mc[None, :], other=0.0).to(tl.float32)
            pre += x2 * tl.load(wrow + 2 * CH, mask=mc, other=0.0).to(tl.float32)[None, :]
        if K > 3:
            x3 = tl.load(rc + src3[:, None] * sr_l, mask=m3[:, None] & mc[None, :], other=0.0).to(tl.float32)
            pre += x3 * tl.load(wrow + 3 * CH, mask=mc, other=0.0).to(tl.float32)[None, :]
        dout = tl.load(dout_ptr + d * so_d + s.to(tl.int64) * so_s + offs_t[:, None] * so_l + offs_c[None, :] * so_c,
                       mask=mt, other=0.0).to(tl.float32)
        sig = tl.sigmoid(pre)
        dpre = dout * sig * (1 + pre * (1 - sig))  # d silu(pre) / d pre; zero wherever dout is masked
        pptr = dpre_ptr + d * sp_d + s.to(tl.int64) * sp_s + offs_t[:, None] * sp_l + offs_c[None, :] * sp_c
        tl.store(pptr, dpre.to(dpre_ptr.dtype.element_ty), mask=mt)
        accb += dpre
        acc0 += dpre * x0
        if K > 1:
            acc1 += dpre * x1
        if K > 2:
            acc2 += dpre * x2
        if K > 3:
            acc3 += dpre * x3
    dwp = dw_ptr + (d * CH + offs_c) * K  # dw (2, c, K) float32
    tl.atomic_add(dwp, tl.sum(acc0, axis=0), mask=mc)
    if K > 1:
        tl.atomic_add(dwp + 1, tl.sum(acc1, axis=0), mask=mc)
    if K > 2:
        tl.atomic_add(dwp + 2, tl.sum(acc2, axis=0), mask=mc)
    if K > 3:
        tl.atomic_add(dwp + 3, tl.sum(acc3, axis=0), mask=mc)
    tl.atomic_add(db_ptr + d * CH + offs_c, tl.sum(accb, axis=0), mask=mc)


@triton.jit
def _conv_draw_kernel(
    dpre_ptr, wt_ptr, draw_ptr, L, CH,
    sp_d, sp_s, sp_l, sp_c,
    sdr_s, sdr_l, sdr_d, sdr_c,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Backward, pass 2. One program: a (positions u × channels) tile of one sequence and direction of
    draw (s, l, 2, c): draw[u] = Σ_i w[i] · dpre[t_i(u)], t_i(u) = u − sign·(i − (K−1)) the output position that
    reads raw[u] through tap i (no term where t_i(u) falls outside [0, L)). wt is the weight as (2, K, c)."""
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_sd = tl.program_id(2)
    S = tl.num_programs(2) // 2
    d = pid_sd // S
    s = pid_sd % S
    sign = 1 - 2 * d
    offs_u = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # positions u of raw
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < CH
    pc = dpre_ptr + d * sp_d + s.to(tl.int64) * sp_s + offs_c[None, :] * sp_c
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for i in tl.static_range(K):
        t = offs_u - sign * (i - (K - 1))
        m = (t >= 0) & (t < L)
        wi = tl.load(wt_ptr + (d * K + i) * CH + offs_c, mask=mc, other=0.0).to(tl.float32)
        g = tl.load(pc + t[:, None] * sp_l, mask=m[:, None] & mc[None, :], other=0.0)
        acc += g.to(tl.float32) * wi[None, :]
    dptr = draw_ptr + s.to(tl.int64) * sdr_s + d * sdr_d + offs_u[:, None] * sdr_l + offs_c[None, :] * sdr_c
    tl.store(dptr, acc.to(draw_ptr.dtype.element_ty), mask=(offs_u < L)[:, None] & mc[None, :])


# forward: channels per program, positions per loop step, warps (one warp, 8 channels per thread: 16-byte loads).
# H200, paper size at batch 8: 1.10-1.19 ms per call with four rows loaded ahead (1.46-1.52 ms without; 1.66 ms for
# the earlier (positions × channels) tiles that loaded each raw element once per tap)
_FWD_BLOCK_C, _FWD_ROWS, _FWD_WARPS = 256, 8, 1
_BLOCK_C = 128  # backward tiles' channels
_SEQS_PER_PROGRAM = 16  # backward pass 1: sequences whose weight gradients one program sums before its atomics
# (H200, paper size: 16 took 6.25 ms per backward against 7.69 for 8; `bench_gpu.py --scan-sweep`)
# backward pass 1 holds K raw tiles, dout, pre and five float32 partial sums per element: 16 positions × 128 channels
# over 8 warps is one row of 8 channels per thread: 128 registers at K = 4 on sm_90 (two rows per thread: 255)
_DPRE_BLOCK_T, _DPRE_WARPS = 16, 8
_DRAW_BLOCK_T, _DRAW_WARPS = 32, 4


def conv_silu_fwd(raw: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """raw (s, l, 2, c), weight (2, c, k), bias (2, c) → (2, s, l, c) in raw's dtype."""
    s, l, two, c = raw.shape
    if two != 2 or weight.shape[:2] != (2, c) or bias.shape != (2, c):
        raise ValueError(f"conv shapes disagree: raw {tuple(raw.shape)}, weight {tuple(weight.shape)}, "
                         f"bias {tuple(bias.shape)}")
    out = torch.empty(2, s, l, c, device=raw.device, dtype=raw.dtype)
    if s and l:
        _conv_fwd_kernel[(triton.cdiv(c, _FWD_BLOCK_C), 2 * s)](
            raw, weight.contiguous(), bias.contiguous(), out, s, l, c, *raw.stride(), *out.stride(),
            K=weight.shape[-1], BLOCK_C=_FWD_BLOCK_C, ROWS=_FWD_ROWS, num_warps=_FWD_WARPS,
            FAST_SILU=fast_silu(raw.dtype))
    return out


def conv_silu_bwd(dout: Tensor, raw: Tensor, weight: Tensor, bias: Tensor,
                  draw: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (draw (s, l, 2, c) in raw's dtype, dweight (2, c, k) and dbias (2, c) in float32).

    `draw`, if given, is where the input gradient is written: any (s, l, 2, c) tensor, e.g. a strided slice of the
    in-projection's gradient."""
    s, l, _, c = raw.shape
    if draw is None:
        draw = torch.empty(s, l, 2, c, device=raw.device, dtype=raw.dtype)
    elif draw.shape != raw.shape:
        raise ValueError(f"draw must be shaped like raw {tuple(raw.shape)}, got {tuple(draw.shape)}")
    dw = torch.zeros(weight.shape, device=raw.device, dtype=torch.float32)
    db = torch.zeros(bias.shape, device=raw.device, dtype=torch.float32)
    k = weight.shape[-1]
    if not 1 <= k <= 4:
        raise ValueError(f"the fast conv1d supports d_conv 1..4, got {k}; use the 'torch' backend")
    if s and l:
        wt = weight.transpose(1, 2).contiguous()  # (2, k, c): one tap of a channel block is contiguous
        seqs = _SEQS_PER_PROGRAM
        dpre = torch.empty(2, s, l, c, device=raw.device, dtype=raw.dtype)  # (2, s, l, c): d loss / d pre-activation
        grid = (triton.cdiv(l, _DPRE_BLOCK_T), triton.cdiv(c, _BLOCK_C), 2 * triton.cdiv(s, seqs))
        _conv_dpre_kernel[grid](raw, wt, bias.contiguous(), dout, dpre, dw, db, s, l, c,
                                *raw.stride(), *dout.stride(), *dpre.stride(), K=k,
                                BLOCK_T=_DPRE_BLOCK_T, BLOCK_C=_BLOCK_C, SEQS=seqs, num_warps=_DPRE_WARPS)
        grid = (triton.cdiv(l, _DRAW_BLOCK_T), triton.cdiv(c, _BLOCK_C), 2 * s)
        _conv_draw_kernel[grid](dpre, wt, draw, l, c, *dpre.stride(), *draw.stride(), K=k,
                                BLOCK_T=_DRAW_BLOCK_T, BLOCK_C=_BLOCK_C, num_warps=_DRAW_WARPS)
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
