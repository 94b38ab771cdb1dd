"""Depthwise conv1d + SiLU of both directions of a bidirectional Mamba2 block, as Triton kernels (forward, backward).

Plain twin: `Mamba2.forward`'s `F.silu(conv1d(xBC)[..., :l])` on the sequence (direction 0) and on the flipped
sequence, flipped back (direction 1). Without flips, direction 1 is the anti-causal conv with reversed taps:

    out[0, t] = silu(b₀ + Σ_i w₀[i] · raw[t − (k−1) + i, 0])      taps t−k+1 … t   (zeros before the start)
    out[1, t] = silu(b₁ + Σ_i w₁[i] · raw[t + (k−1) − i, 1])        taps t … t+k−1   (zeros after the end)

`raw` is read in place from the in-projection `(s, l, 2, c)` (any strides); the output is `(2, s, l, c)`, the layout
the scan reads as `(2s, l, ·)`. The forward walks each sequence in scan order with the last K−1 rows in registers
(each raw element loaded once) and the next four loaded ahead; with 16-bit outputs its SiLU uses the hardware tanh.
Backward saves only raw, weight and bias and walks the sequences the same way: it recomputes each pre-activation,
forms dpre = dout · silu'(pre) in registers, sums the weight and bias gradients in float32 registers (one atomic per
channel and program) and writes draw[u] = Σ_i w[i] · dpre[u + (k−1) − i] as soon as its last term is known, so raw
and dout are read once and draw written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from bsmamba2.switches import interpreting


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
def conv_silu_rows(base, cols, tau, L, reverse, s_l, mask_c, w_ch, sw_k, bias, K: tl.constexpr,
                   FAST: tl.constexpr):
    """conv1d + SiLU of one sequence at the scan positions τ (rows) of a tile: out[τ] = silu(b + Σ_i w[i] ·
    raw[τ − (K−1) + i]) in scan order, raw row τ' at memory position τ' or L−1−τ' (reverse), zeros outside [0, L).
    base + cols: the raw channels of position 0; mask_c (cols,) those in range; w_ch (cols,): pointers to the
    channels' tap 0, the next taps sw_k elements apart; bias (cols,) float32. float32 (rows, cols).
    Tap-major weights (sw_k = channels, so the channels of a tap are contiguous) load as whole vectors: with
    channel-major ones every program reads each tap's channels 16 bytes apart."""
    out = bias[None, :]
    for i in tl.static_range(K):
        tp = tau - (K - 1) + i
        t = tl.where(reverse, L - 1 - tp, tp)
        ok = (tp >= 0) & (tp < L)
        raw = tl.load(base + t[:, None] * s_l + cols[None, :], mask=ok[:, None] & mask_c[None, :], other=0.0)
        out = out + tl.load(w_ch + i * sw_k, mask=mask_c, other=0.0).to(tl.float32)[None, :] * raw.to(tl.float32)
    return silu(out, FAST)


@triton.jit
def _conv_raw_row(src, tau, L, d, sr_l, mc, zc):
    """Raw row τ (scan order) of a program's channels, float32; zeros past the end (zc: the channels' zero vector,
    so the position test is a vector: the interpreter takes no scalar mask)."""
    t = tl.where(d == 1, L - 1 - tau, tau)
    return tl.load(src + t * sr_l, mask=mc & (zc + tau < L), other=0.0).to(tl.float32)


@triton.jit
def _conv_channels(w_ptr, b_ptr, d, CH, sw_d, sw_c, sw_k, K: tl.constexpr, BLOCK_C: tl.constexpr):
    """Of a walk over direction d: its BLOCK_C channels (program id 0), their mask, the channels' zero vector, the
    four tap weights (taps past K: zero; tap 0 multiplies raw[τ − (K−1)]) and the bias, float32. Weights (2, CH, K)
    with strides sw_* (channel-major or tap-major), bias (2, CH) contiguous."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < CH
    wrow = w_ptr + d * sw_d + offs_c * sw_c
    w0 = tl.load(wrow, mask=mc, other=0.0).to(tl.float32)
    w1 = tl.load(wrow + sw_k, mask=mc & (K > 1), other=0.0).to(tl.float32)
    w2 = tl.load(wrow + 2 * sw_k, mask=mc & (K > 2), other=0.0).to(tl.float32)
    w3 = tl.load(wrow + 3 * sw_k, mask=mc & (K > 3), other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + d * CH + offs_c, mask=mc, other=0.0).to(tl.float32)
    return offs_c, mc, offs_c * 0, w0, w1, w2, w3, bias


@triton.jit
def _conv_window(src, L, d, s_l, mc, zc):
    """The start of a walk: rows 0 … 4 (scan order), the current row and the four held ahead."""
    return (_conv_raw_row(src, 0, L, d, s_l, mc, zc), _conv_raw_row(src, 1, L, d, s_l, mc, zc),
            _conv_raw_row(src, 2, L, d, s_l, mc, zc), _conv_raw_row(src, 3, L, d, s_l, mc, zc),
            _conv_raw_row(src, 4, L, d, s_l, mc, zc))


@triton.jit
def _conv_pre(bias, w0, w1, w2, w3, back3, back2, back1, cur, K: tl.constexpr):
    """pre[τ] = b + Σ_i w[i] · raw[τ − (K−1) + i] from raw[τ − 3 … τ]."""
    if K == 1:
        pre = bias + w0 * cur
    elif K == 2:
        pre = bias + w0 * back1 + w1 * cur
    elif K == 3:
        pre = bias + w0 * back2 + w1 * back1 + w2 * cur
    else:
        pre = bias + w0 * back3 + w1 * back2 + w2 * back1 + w3 * cur
    return pre


@triton.jit
def _conv_fwd_kernel(
    raw_ptr, w_ptr, b_ptr, out_ptr, S, L, CH, sw_d, sw_c, sw_k,
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
    order each warp had one row in flight (four rows ahead measured faster than none, two, six or eight)."""
    pid_sd = tl.program_id(1)
    d = pid_sd // S
    s = pid_sd % S
    offs_c, mc, zc, w0, w1, w2, w3, bias = _conv_channels(w_ptr, b_ptr, d, CH, sw_d, sw_c, sw_k, K, BLOCK_C)
    src = raw_ptr + s.to(tl.int64) * sr_s + d * sr_d + offs_c * sr_c
    dst = out_ptr + d * so_d + s.to(tl.int64) * so_s + offs_c * so_c
    back1 = tl.zeros((BLOCK_C,), dtype=tl.float32)  # raw[τ − 1], raw[τ − 2], raw[τ − 3]: zeros before the start
    back2 = back1
    back3 = back1
    cur, ahead1, ahead2, ahead3, ahead4 = _conv_window(src, L, d, sr_l, mc, zc)
    for tau0 in range(0, L, ROWS):
        for r in tl.static_range(ROWS):
            tau = tau0 + r
            ahead5 = _conv_raw_row(src, tau + 5, L, d, sr_l, mc, zc)  # issued before this row's store
            act = silu(_conv_pre(bias, w0, w1, w2, w3, back3, back2, back1, cur, K), FAST_SILU)
            t = tl.where(d == 1, L - 1 - tau, tau)
            tl.store(dst + t * so_l, act.to(out_ptr.dtype.element_ty), mask=mc & (zc + tau < L))
            back3, back2, back1, cur, ahead1, ahead2, ahead3, ahead4 = (back2, back1, cur, ahead1, ahead2, ahead3,
                                                                        ahead4, ahead5)


@triton.jit
def _conv_bwd_kernel(
    raw_ptr, dout_ptr, w_ptr, b_ptr, draw_ptr, dw_ptr, db_ptr, S, L, CH, SEQS, sw_d, sw_c, sw_k,
    sr_s, sr_l, sr_d, sr_c,
    so_d, so_s, so_l, so_c,
    sdr_s, sdr_l, sdr_d, sdr_c,
    K: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
):
    """Backward in one walk. One program: BLOCK_C channels of SEQS consecutive sequences of one direction, each walked
    in scan order τ as the forward walks it (both directions are the causal sum there), with the last K−1 raw rows
    and the last K−1 values of dpre in registers. At step τ:

        pre[τ]  = b + Σ_i w[i] · raw[τ − (K−1) + i]                (recomputed, as the forward computed it)
        dpre[τ] = dout[τ] · silu'(pre[τ])
        dw[i]  += dpre[τ] · raw[τ − (K−1) + i],   db += dpre[τ]    (float32 registers, one atomic per program)
        draw[u] = Σ_i w[i] · dpre[u + (K−1) − i]  for u = τ − (K−1): every output position that reads raw[u] is done

    so raw and dout are read once and draw written once, with no dpre buffer in memory. The walk runs K−1 steps past
    the end (rows past the end are zeros, so their dpre is zero) to finish the last draw rows. Rows τ+1 … τ+4 of raw
    and dout are held ahead and row τ+5 loaded before row τ's store, for the reason `_conv_fwd_kernel` gives."""
    pid_sd = tl.program_id(1)
    n_sblocks = tl.cdiv(S, SEQS)
    d = pid_sd // n_sblocks
    s0 = (pid_sd % n_sblocks) * SEQS
    offs_c, mc, zc, w0, w1, w2, w3, bias = _conv_channels(w_ptr, b_ptr, d, CH, sw_d, sw_c, sw_k, K, BLOCK_C)
    acc0 = tl.zeros((BLOCK_C,), dtype=tl.float32)  # Σ dpre · raw through tap i, and Σ dpre
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    accb = acc0
    for si in tl.range(0, tl.minimum(SEQS, S - s0), loop_unroll_factor=1):
        s64 = (s0 + si).to(tl.int64)
        src = raw_ptr + s64 * sr_s + d * sr_d + offs_c * sr_c
        gsrc = dout_ptr + d * so_d + s64 * so_s + offs_c * so_c
        dst = draw_ptr + s64 * sdr_s + d * sdr_d + offs_c * sdr_c
        back1 = tl.zeros((BLOCK_C,), dtype=tl.float32)  # raw[τ − 1 … τ − 3] and dpre[τ − 1 … τ − 3]: zeros before
        back2 = back1  # the start
        back3 = back1
        dp1 = back1
        dp2 = back1
        dp3 = back1
        cur, ahead1, ahead2, ahead3, ahead4 = _conv_window(src, L, d, sr_l, mc, zc)
        gcur, gahead1, gahead2, gahead3, gahead4 = _conv_window(gsrc, L, d, so_l, mc, zc)
        for tau0 in range(0, L + K - 1, ROWS):
            for r in tl.static_range(ROWS):
                tau = tau0 + r
                ahead5 = _conv_raw_row(src, tau + 5, L, d, sr_l, mc, zc)  # issued before this row's store
                gahead5 = _conv_raw_row(gsrc, tau + 5, L, d, so_l, mc, zc)
                pre = _conv_pre(bias, w0, w1, w2, w3, back3, back2, back1, cur, K)
                sig = tl.sigmoid(pre)
                dp = gcur * sig * (1 + pre * (1 - sig))  # dout · d silu(pre) / d pre; zero past the end
                accb += dp
                if K == 1:
                    acc0 += dp * cur
                elif K == 2:
                    acc0 += dp * back1
                    acc1 += dp * cur
                elif K == 3:
                    acc0 += dp * back2
                    acc1 += dp * back1
                    acc2 += dp * cur
                else:
                    acc0 += dp * back3
                    acc1 += dp * back2
                    acc2 += dp * back1
                    acc3 += dp * cur
                dr = w0 * dp + w1 * dp1 + w2 * dp2 + w3 * dp3  # taps past K have zero weights
                u = tau - (K - 1)  # the raw row whose gradient is complete
                t = tl.where(d == 1, L - 1 - u, u)
                tl.store(dst + t * sdr_l, dr.to(draw_ptr.dtype.element_ty), mask=mc & (zc + u >= 0) & (zc + u < L))
                dp3, dp2, dp1 = dp2, dp1, dp
                back3, back2, back1, cur, ahead1, ahead2, ahead3, ahead4 = (back2, back1, cur, ahead1, ahead2,
                                                                            ahead3, ahead4, ahead5)
                gcur, gahead1, gahead2, gahead3, gahead4 = gahead1, gahead2, gahead3, gahead4, gahead5
    dwp = dw_ptr + (d * CH + offs_c) * K  # dw (2, c, K) float32
    tl.atomic_add(dwp, acc0, mask=mc)
    if K > 1:
        tl.atomic_add(dwp + 1, acc1, mask=mc)
    if K > 2:
        tl.atomic_add(dwp + 2, acc2, mask=mc)
    if K > 3:
        tl.atomic_add(dwp + 3, acc3, mask=mc)
    tl.atomic_add(db_ptr + d * CH + offs_c, accb, mask=mc)


# forward: channels per program, positions per loop step, warps (one warp, 8 channels per thread: 16-byte loads);
# tuned on the device at the paper's size (results: benchmarks/RESULTS.md; history: docs/perf-log.md)
_FWD_BLOCK_C, _FWD_ROWS, _FWD_WARPS = 256, 8, 1
# backward: channels per program, positions per loop step, warps, and the rows one program walks at least (whole
# sequences: at the band axis's 62 positions, 8 sequences per program, so the weight-gradient atomics stay few);
# tuned at the training shapes, against the earlier two passes (dpre tiles, then draw), 128 channels and 8 rows
_BWD_BLOCK_C, _BWD_ROWS, _BWD_WARPS, _BWD_MIN_ROWS = 256, 4, 1, 512


def _bwd_seqs_per_program(l: int) -> int:
    """Sequences one backward program walks: enough for `_BWD_MIN_ROWS` positions, at most 16."""
    return max(1, min(16, _BWD_MIN_ROWS // max(l, 1)))


def conv_taps_major(weight: Tensor) -> Tensor:
    """A conv weight (ndir, c, k) stored tap-major: the same values, viewed as (ndir, c, k), with each tap's channels
    contiguous, so the band axis's fused kernels load a tap's weights as one vector per program; every conv
    kernel reads the weight through its strides."""
    return weight.transpose(1, 2).contiguous().transpose(1, 2)


def conv_silu_fwd(raw: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """raw (s, l, 2, c), weight (2, c, k) (any strides), bias (2, c) → (2, s, l, c) in raw's dtype."""
    s, l, two, c = raw.shape
    if two != 2 or weight.shape[:2] != (2, c) or bias.shape != (2, c):
        raise ValueError(f"conv shapes disagree: raw {tuple(raw.shape)}, weight {tuple(weight.shape)}, "
                         f"bias {tuple(bias.shape)}")
    out = torch.empty(2, s, l, c, device=raw.device, dtype=raw.dtype)
    if s and l:
        _conv_fwd_kernel[(triton.cdiv(c, _FWD_BLOCK_C), 2 * s)](
            raw, weight, bias.contiguous(), out, s, l, c, *weight.stride(), *raw.stride(), *out.stride(),
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
        seqs = _bwd_seqs_per_program(l)
        grid = (triton.cdiv(c, _BWD_BLOCK_C), 2 * triton.cdiv(s, seqs))
        _conv_bwd_kernel[grid](raw, dout, weight, bias.contiguous(), draw, dw, db, s, l, c, seqs, *weight.stride(),
                               *raw.stride(), *dout.stride(), *draw.stride(), K=k,
                               BLOCK_C=_BWD_BLOCK_C, ROWS=_BWD_ROWS, num_warps=_BWD_WARPS)
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
