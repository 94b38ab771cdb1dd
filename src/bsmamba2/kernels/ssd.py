"""The SSD scan (the Mamba2 recurrence) on the GPU: which kernel runs, with which tiles, and the autograd wrapper.

A thin dispatcher over the kernel modules, which never import it back:
    ssd_common       `@triton.jit` helpers shared by all of them, tile sizes, product dtypes
    ssd_time         the time-axis forward (sequences of several chunks; 801 frames at the paper's size)
    ssd_band         the band-axis forward (sequences of one chunk; the 62 bands), with fused inference options
    ssd_backward     the backward pass, both axes
    ssd_time_sm90    the time-axis forward for Hopper GPUs, in Gluon
    ssd_band_sm90    the band-axis forward at inference for Hopper GPUs, in Gluon
Plain twins: `bsmamba2.ssd.ssd_chunked` (and `ssd_sequential`, the ground truth). Per head h, with a_t = dt_t·A_h,
cum_t = Σ_{k≤t} a_k and v_t = dt_t·x_t, every form computes

    y_i = Σ_{j≤i} exp(cum_i − cum_j) (C_i·B_j) v_j + D_h x_i

The two axes differ by length: a sequence no longer than the chunk (`block_q_for`) is the band axis, one chunk, the
quadratic form only; a longer one is the time axis, chunks with a state carried between them. Tuning (chunk
length, grid order, warps, stages, Gluon on or off) comes from `bsmamba2.switches`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from bsmamba2 import switches
from bsmamba2.kernels import ssd_backward, ssd_band, ssd_band_sm90, ssd_time, ssd_time_sm90
from bsmamba2.kernels.conv import fast_silu
from bsmamba2.kernels.ssd_common import block_size, dot_dtype, dot_precision


def block_q_for(length: int) -> int:
    """Chunk length of the fast scan: BSMAMBA2_SSD_BLOCK (tuned: 64); a sequence no longer than that is one chunk
    of its own (power-of-two) size, as the band axis (62) is."""
    block = switches.ssd_block()
    return block_size(length) if length <= block else block


def _heads_first(seqs: int) -> bool:
    """Grid order of the per-(sequence, head) kernels: heads first (BSMAMBA2_SSD_HEADS_FIRST=0 turns it off), unless
    the sequences exceed the grid's second dimension (65535)."""
    return seqs <= 65535 and switches.ssd_heads_first()


def _num_warps(kernel: str, default: int) -> int:
    """Warps per program: BSMAMBA2_SSD_WARPS_<kernel> (FWD: the time axis, FWD_BAND, BWD for the per-head chunk
    kernel, BWD_GROUPED for the grouped one, BWD_STATES), else the tuned default."""
    return switches.ssd_warps(kernel, default)


def _num_stages(x: Tensor) -> int:
    """Software-pipelining stages (BSMAMBA2_SSD_STAGES overrides for 16-bit inputs). float32 tiles are twice as
    large: no pipelining, or shared memory runs out on the head loop."""
    return 1 if x.dtype == torch.float32 else switches.ssd_stages()


def _bwd_grouped(several_chunks: bool) -> bool:
    """Which chunk kernel `ssd_bwd` runs on the time axis (several chunks) or the band axis:
    `bwd_chunk_grouped_kernel` (one program per (sequence, chunk, group), dB and dC summed over the heads inside
    it) when BSMAMBA2_SSD_BWD_GROUPED is 1 or names this axis (by default the band axis), else `bwd_chunk_kernel`
    (one per (sequence, chunk, head), per-head dB and dC buffers summed after it; by default the time axis)."""
    return switches.ssd_bwd_grouped("time" if several_chunks else "band")


def _sm90_scan() -> bool:
    """Whether forward scans on Hopper GPUs take the Gluon kernels (`ssd_time_sm90`, `ssd_band_sm90`, where they
    apply): yes unless BSMAMBA2_SSD_GLUON=0 (for A/B runs)."""
    return switches.ssd_gluon()


def time_scan_kernel(x: Tensor, B: Tensor, C: Tensor, block_q: int) -> str:
    """Which kernel `ssd_fwd` runs for a time-axis sequence (several chunks) with these inputs, scanned in chunks of
    block_q (`block_q_for`): "gluon-sm90" (`ssd_time_sm90`) or "triton" (`ssd_time`)."""
    return "gluon-sm90" if _sm90_scan() and ssd_time_sm90.applies(x, B, C, block_q) else "triton"


def band_scan_kernel(x: Tensor, B: Tensor, C: Tensor, x_conv, bc_conv, dt_bias, z) -> str:
    """Which kernels `ssd_fwd` runs for a band-axis sequence (one chunk) with these inputs and fused options:
    "gluon-sm90" (`ssd_band_sm90`, one kernel on Hopper GPUs, for calls with every fused option: the band axis at
    inference) unless BSMAMBA2_SSD_GLUON or BSMAMBA2_SSD_GLUON_BAND is 0, else "triton" (`ssd_band`: the C·Bᵀ
    stage, then the scan)."""
    on = _sm90_scan() and switches.ssd_gluon_band()
    fused = (x_conv is not None and bc_conv is not None and dt_bias is not None and z is not None
             and x_conv[0].shape[-1] == bc_conv[0].shape[-1])
    if on and fused and ssd_band_sm90.applies(x, B, C, z, x_conv[0].shape[-1]):
        return "gluon-sm90"
    return "triton"


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
    """C Bᵀ of band-axis sequences (one chunk), in scan order and zero above the diagonal: B/C (s, l, g, n),
    l ≤ the chunk → G (s, g, Q, Q), Q = `block_q_for(l)`, in B's dtype (rows and columns past l are zero). The
    forward scan's first stage on the band axis; its twin is `causal_cb_reference`.

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
        ssd_band.band_cb_kernel[(s * g,)](B, C, G, cw, cb, l, g, s // 2 if dir_mode == 2 else s, cw.shape[1], *w_strides,
                                   *B.stride(), *C.stride(), G.stride(0), G.stride(1), N=n, BLOCK_Q=bq,
                                   BLOCK_N=block_size(n),
                                   DIR_MODE=dir_mode, PREC=dot_precision(B), DOT=dot_dtype(B),
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

    Fused options for inference (no gradients) on band-axis sequences, which read the in-projection in place:
      x_conv  (weight (ndir, c, k), bias (ndir, c)), channels in Mamba2's order [x, B, C]: x is raw and passes
              through conv1d + SiLU in the kernel (direction 1 anti-causal in memory order, as `conv_silu_fwd`).
              The weight may have any strides; tap-major storage (`conv.conv_taps_major`) reads fastest.
      bc_conv the same weights: B and C are raw too, convolved in the C·Bᵀ stage.
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
        raise ValueError(f"the fused options are for band-axis sequences (one chunk, length <= {bq}); on longer "
                         "ones run conv_silu_fwd, softplus_dt and gated_proj as their own passes")
    A, Dc = A.float().contiguous(), (D.float().contiguous() if D is not None else A)
    seqs_per_dir = s // 2 if dir_mode == 2 else s
    meta = dict(BLOCK_Q=bq, BLOCK_P=block_size(p), DIR_MODE=dir_mode, HAS_D=D is not None, PREC=dot_precision(x),
                DOT=dot_dtype(x))
    heads_first = _heads_first(s)
    if l <= bq and band_scan_kernel(x, B, C, x_conv, bc_conv, dt_bias, z) == "gluon-sm90":
        ssd_band_sm90.band_fwd_sm90(x, dt, A, B, C, D if D is None else Dc, dir_mode, x_conv, bc_conv, dt_bias, z, y, ss)
        return result
    if l <= bq:
        G = causal_cb(B, C, dir_mode, conv=bc_conv)  # (s, g, bq, bq)
        ptrs, channels, fstrides, fmeta = _fused_inputs(x, A, x_conv, dt_bias, z, ss)
        ssd_band.band_fwd_kernel[(h, s) if heads_first else (s * h,)](
            x, dt, A, G, Dc, y, *ptrs, l, h, seqs_per_dir, h // g, *channels, *x.stride(), *dt.stride(), G.stride(0),
            G.stride(1), *y.stride(), *fstrides, P=p, **meta, **fmeta, HEADS_FIRST=heads_first, num_stages=1,
            num_warps=_num_warps("FWD_BAND", 4))
    elif time_scan_kernel(x, B, C, bq) == "gluon-sm90":
        ssd_time_sm90.time_fwd_sm90(x, dt, A, B, C, D if D is None else Dc, dir_mode, out=y)
    else:
        grid = (h, s) if heads_first else (s, h)
        ssd_time.time_fwd_kernel[grid](x, dt, A, B, C, Dc, y, l, h, seqs_per_dir, h // g, *x.stride(), *dt.stride(),
                              *B.stride(), *C.stride(), *y.stride(), P=p, N=n, BLOCK_N=block_size(n), **meta,
                              HEADS_FIRST=heads_first, num_stages=_num_stages(x), num_warps=_num_warps("FWD", 4))
    return result


def ssd_bwd(dy: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
            dir_mode: int = 0, dx: Tensor | None = None, dB: Tensor | None = None,
            dC: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients (dx, ddt, dA, dB, dC, dD) of the scan for the output gradient dy `(s, l, h, p)`.

    dx has x's dtype (or is written into `dx`, any (s, l, h, p) tensor, if given); ddt, dA, dD are float32; dB and
    dC are float32 `(s, l, g, n)`, summed over each group's heads (or written into `dB`, `dC`, any (s, l, g, n)
    tensors of any dtype and strides, if given: the head sum goes straight there). On the band axis (one chunk) the
    chunk kernel sums them over the heads itself (`bwd_chunk_grouped_kernel`); on the time axis it writes per-head
    buffers that are summed after it (`bwd_chunk_kernel`), the faster there (BSMAMBA2_SSD_BWD_GROUPED).
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
    meta = dict(BLOCK_Q=bq, BLOCK_P=block_size(p), BLOCK_N=block_size(n), DIR_MODE=dir_mode, PREC=dot_precision(x),
                DOT=dot_dtype(x))
    sizes = (l, h, s // 2 if dir_mode == 2 else s, h // g, p, n)
    grouped = _bwd_grouped(n_chunks > 1)
    buf_dtype = torch.float32 if x.dtype == torch.float32 else x.dtype
    if grouped:  # dB and dC summed over each group's heads inside the chunk kernel, written once
        dB, dC = (torch.empty(s, l, g, n, device=dev, dtype=torch.float32) if t is None else t for t in (dB, dC))
    else:  # per-head dB and dC (no atomics), summed over each group's heads below
        dBh = torch.empty(s, l, h, n, device=dev, dtype=buf_dtype)
        dCh = torch.empty_like(dBh)
    if n_chunks > 1:  # the states entering each chunk and their gradients: (s, h, chunks, p, n)
        states = torch.empty(s, h, n_chunks, p, n, device=dev, dtype=buf_dtype)
        dstates = torch.empty_like(states)
        cross = torch.zeros(s, h, n_chunks, device=dev, dtype=torch.float32)  # exp(Σa)·⟨dS_{c+1}, S_c⟩
        heads_first = _heads_first(s)
        grid = (h, s) if heads_first else (s, h)
        for u, k, out, backward in ((x, B, states, False), (dy, C, dstates, True)):
            ssd_backward.bwd_states_kernel[grid](u, dt, A_, k, out, states, cross, *sizes, *u.stride(), *dt.stride(),
                                         *k.stride(), *out.stride(), **meta, BACKWARD=backward, HEADS_FIRST=heads_first,
                                         num_stages=_num_stages(x), num_warps=_num_warps("BWD_STATES", 4))
        st_strides = states.stride()
    else:
        states = dstates = cross = ddt  # placeholders: one chunk has no states
        st_strides = (0,) * 5
    if grouped:
        ssd_backward.bwd_chunk_grouped_kernel[(s * n_chunks * g,)](
            x, dt, A_, B, C, D_, dy, states, dstates, cross, dx, ddt, dA, dB, dC, dD, *sizes, *x.stride(),
            *dt.stride(), *B.stride(), *C.stride(), *dy.stride(), *dx.stride(), *dB.stride(), *dC.stride(),
            *st_strides, **meta, HAS_D=D is not None, STATES=n_chunks > 1, SPLIT=switches.ssd_bwd_split(),
            num_stages=1 if x.dtype == torch.float32 else switches.ssd_bwd_stages(),
            num_warps=_num_warps("BWD_GROUPED" if n_chunks > 1 else "BWD_GROUPED_BAND", 8))
        return dx, ddt, dA, dB, dC, (dD if D is not None else None)
    ssd_backward.bwd_chunk_kernel[(s * n_chunks * h,)](
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
