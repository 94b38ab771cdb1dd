"""The fast bidirectional Mamba2 block on tensors: both directions share every launch, the linear maps merged.

Tensors in, tensors out, weights included: the module-aware side (which weights, merged how, cached where, and
whether a block qualifies) is `bsmamba2.fused_block`. The plain block (`bsmamba2.mamba2.BiMamba2Block`) computes,
for x `(s, l, d)`,

    f = x + out_f(Mamba2_f(rms(x) · w_f)),   b = flip(x' + out_b(Mamba2_b(rms(x') · w_b))),  x' = flip(x)
    y = [f, b] Wmᵀ + bm + x                                   (the 1×1 ConvTranspose1d, 2d → d)

Here, with the same parameters and the same function:
    1. rms(x) once (both pre-norms have the same eps); the pre-norm gains are folded into the in-projections, and
       both directions' in-projections are one matrix product (d → 2·(d_inner + conv_dim + heads)). With autograd,
       the normalized x is not kept for backward (`PreNormIn` recomputes it from x).
    2. The backward direction never flips: its causal conv1d becomes anti-causal (taps t..t+3) and its scan reads
       positions L−1−τ (`ssd_scan_bidirectional`), so one conv pass and one scan launch serve both directions.
    3. out_proj and the 1×1 merge are folded:  [x + o_f, x + o_b] Wmᵀ = [g_f, g_b] W_gᵀ + x W_xᵀ with
       W_g = [Wm₁ᵀ·Wo_f, Wm₂ᵀ·Wo_b] (d × 2·d_inner), W_x = (Wm₁ + Wm₂)ᵀ: one product on the gated-norm
       outputs of both directions, which adds the small d × d product on x (and its bias) in its epilogue.
    4. conv1d + SiLU → scan → gated RMSNorm → the product on the gated-norm outputs (gn W_gᵀ of item 3) form one
       autograd node (`MixerCore`), whose backward writes the gradients of the split views into shared buffers
       instead of concatenating them, and which keeps neither the conv output nor gn for backward: both are
       recomputed there from what it keeps anyway (the in-projection's output and the scan's output).
    5. Without autograd (`block_inference`, when the gated norm spans all of d_inner, as in the paper's model), no
       normalized tensor goes through memory. The norm's row scale rstd commutes with the out-projection, so the
       products run on g = y·silu(z) (norm gains folded into the weights) and rstd is applied in the residual add:
           y = rstd_f · g_f W'_fᵀ + rstd_b · g_b W'_bᵀ + x W_xᵀ + bm + x.
       On the band axis (sequences of one chunk) the scan kernel reads the in-projection in place, applies conv1d +
       SiLU to x (and, in the C·Bᵀ stage, to B and C) and the softplus to dt, and writes g and Σg² per head; the
       conv and gated-norm passes are gone. On the time axis the scan's loop is latency-bound and each of these
       steps inside it cost more than its own pass, so conv, softplus and scan run as in training, and g is formed
       inside the out-projection (`gated_proj`), a Triton product that also sums g².
       In a model's inference loop the merge also writes the next block's pre-norm rms_scale(out) beside out, from
       the rows it holds, and that block reads it instead of normalizing again (`x_scaled=`, `scaled=`).
The RMS scale, conv1d + SiLU, the softplus of dt, the scan, the gated RMSNorm and the residual add into the next
pass's layout are Triton kernels (`norm.py`, `conv.py`, `dt.py`, `ssd.py`, `residual.py`); the matrix products are
cuBLAS, but for the inference out-projection on the time axis (`gated_proj.py`). Nothing is compiled by
`torch.compile`, so new shapes (batch sizes, lengths) cost no recompilation.

Letters: s sequences, l length, d model dim, e = d_inner, c = conv_dim, h heads, p headdim, g groups, n d_state.
`dims` is (e, c, h, p, g, n) throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bsmamba2.kernels.conv import conv_silu_bidirectional, conv_silu_bwd, conv_silu_fwd, conv_taps_major
from bsmamba2.kernels.dt import softplus_dt, softplus_dt_reference
from bsmamba2.kernels.gated_proj import gated_proj
from bsmamba2.kernels.norm import gated_norm_bidirectional, gated_norm_bwd, gated_norm_fwd, rms_scale
from bsmamba2.kernels.residual import add_into, gated_merge_into
from bsmamba2.kernels.ssd import block_q_for, ssd_bwd, ssd_fwd, ssd_scan_bidirectional


class PreNormIn(torch.autograd.Function):
    """The pre-norm (without its gain) and the in-projection as one autograd node: x `(s, l, d)`, w_in `(m, d)` →
    rms_scale(x) w_inᵀ `(s, l, m)`, the product as F.linear takes it (under autocast too).

    The same function as `prenorm_in_reference`, which keeps the normalized xn for w_in's gradient; this node keeps
    x instead (which the block keeps alive anyway, for the merge's x-terms) and recomputes xn from it in backward.
    """

    @staticmethod
    def forward(ctx, x, w_in, eps):
        ctx.save_for_backward(x, w_in)
        ctx.eps = eps
        return F.linear(rms_scale(x, eps), w_in)

    @staticmethod
    def backward(ctx, dzx):
        x, w_in = ctx.saved_tensors
        with torch.enable_grad():  # the pre-norm again, its own backward below
            x_ = x.detach().requires_grad_()
            xn = rms_scale(x_, ctx.eps)
        dzx2 = dzx.reshape(-1, dzx.shape[-1])  # (s·l, m), in the product's dtype
        dw_in = dzx2.t().mm(xn.detach().reshape(-1, xn.shape[-1]).to(dzx.dtype)).to(w_in.dtype)  # (m, d)
        if not ctx.needs_input_grad[0]:
            return None, dw_in, None
        dxn = dzx2.mm(w_in.to(dzx.dtype)).view(xn.shape).to(xn.dtype)
        dx, = torch.autograd.grad(xn, x_, dxn)
        return dx, dw_in, None


def prenorm_in_reference(x: Tensor, w_in: Tensor, eps: float) -> Tensor:
    """`PreNormIn` as the chain of the pre-norm and F.linear (its twin in the tests)."""
    return F.linear(rms_scale(x, eps), w_in)


class MixerCore(torch.autograd.Function):
    """conv1d + SiLU → SSD scan → gated RMSNorm of both directions → the folded out-projection, from the
    in-projection's output, as one autograd node: zxbcdt `(s, l, 2, e + c + h)`, acc `(s, l, d)` →
    acc + gn W_gᵀ (written into acc), gn `(s, l, 2e)` the gated-norm outputs of both directions side by side.

    The same function as `conv_silu_bidirectional`, `ssd_scan_bidirectional`, `gated_norm_bidirectional` and the
    product chained on the split views (`mixer_core_reference`). acc comes first: a node that writes into a view
    (F.linear's output may be one) must take it as its first input, where autograd's CopySlices looks for it.
    As one node:
      - the backward writes the gradients of z, xBC and dt straight into one buffer shaped like the in-projection's
        output, and those of x, B and C into one buffer shaped like the conv output: autograd's split backward
        would concatenate them instead (one strided copy of each);
      - it keeps for backward only the in-projection's output, dt and the scan's output y (and the weights): the
        conv output xbc `(2, s, l, c)` (unless `keep_conv_output`: kept, when memory allows, to save that pass) and
        gn are recomputed in backward from them (`conv_silu_fwd`; gn by the gated norm's backward kernel, in the
        same pass as its gradients: deterministic kernels computing as the forward did, so the same values), where
        the chain keeps both alive from the forward to the backward of the block.
    w_g is in the products' dtype, cast to gn's for the product, as `acc.addmm_` would take it.
    """

    @staticmethod
    def forward(ctx, acc, zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, w_g, dims, eps, group_size,
                keep_conv_output=False):
        e = dims[0]
        s, l, d = acc.shape
        xbc, dt, y = conv_scan(zxbcdt, conv_w, conv_b, dt_bias, A, D, dims)
        gn = gated_norm_fwd(y.view(2, s, l, e), zxbcdt[..., :e], norm_w, eps, group_size)  # (s, l, 2e)
        acc.view(s * l, d).addmm_(gn.view(s * l, 2 * e), w_g.t().to(gn.dtype))  # + gn W_gᵀ, summed in the epilogue
        ctx.mark_dirty(acc)
        kept = (xbc,) if keep_conv_output else ()  # else dropped here, recomputed in backward
        ctx.save_for_backward(zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, w_g, dt, y, *kept)
        ctx.dims, ctx.eps, ctx.group_size, ctx.gn_dtype = dims, eps, group_size, gn.dtype
        return acc

    @staticmethod
    def backward(ctx, dout):
        zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, w_g, dt, y, *kept = ctx.saved_tensors
        e, c, h, p, g, n = ctx.dims
        s, l, d = dout.shape
        z, xbc_raw, _ = zxbcdt.split([e, c, h], dim=-1)
        dout2 = dout.reshape(s * l, d)
        dgn = dout2.mm(w_g.to(ctx.gn_dtype)).view(s, l, 2 * e)
        dzx = torch.empty_like(zxbcdt)  # (s, l, 2, e + c + h): the in-projection output's gradient
        dz, draw, ddt_raw = dzx.split([e, c, h], dim=-1)
        # the gated norm's backward also recomputes gn (the forward's values) for W_g's gradient
        gn = torch.empty(s, l, 2 * e, device=y.device, dtype=ctx.gn_dtype)
        dy, _, dnorm_w = gated_norm_bwd(dgn, y.view(2, s, l, e), z, norm_w, ctx.eps, ctx.group_size, dz=dz, out=gn)
        del dgn
        dw_g = gn.view(s * l, 2 * e).t().mm(dout2).t().to(w_g.dtype)  # (d, 2e)
        del gn
        # (2, s, l, c): the forward's conv output, kept or recomputed
        xbc = kept[0] if kept else conv_silu_fwd(xbc_raw, conv_w, conv_b)
        dxbc = torch.empty_like(xbc)
        dxs, dB, dC = _scan_inputs(dxbc, ctx.dims)
        xs, B, C = _scan_inputs(xbc, ctx.dims)
        _, ddt, dA, _, _, dD = ssd_bwd(dy.view(2 * s, l, h, p), xs, dt.view(2 * s, l, h), A, B, C, D, dir_mode=2,
                                        dx=dxs, dB=dB, dC=dC)
        del xbc, xs, B, C, dy
        _, dconv_w, dconv_b = conv_silu_bwd(dxbc, xbc_raw, conv_w, conv_b, draw=draw)
        # dt = softplus(u), u = dt_raw + dt_bias: du = ddt · sigmoid(u), and sigmoid(u) = 1 − exp(−dt)
        du = ddt.view(2, s, l, h) * -torch.expm1(-dt)  # (2, s, l, h) float32
        ddt_raw.copy_(du.permute(1, 2, 0, 3))
        return (dout, dzx, dconv_w.to(conv_w.dtype), dconv_b.to(conv_b.dtype), du.sum((1, 2)).to(dt_bias.dtype),
                dA.to(A.dtype), dD.to(D.dtype), dnorm_w.to(norm_w.dtype), dw_g, None, None, None, None)


def conv_scan(zxbcdt: Tensor, conv_w, conv_b, dt_bias, A, D, dims) -> tuple[Tensor, Tensor, Tensor]:
    """conv1d + SiLU, softplus of dt and the scan of both directions, each its own pass, from the in-projection
    `(s, l, 2, e + c + h)` → (xbc (2, s, l, c), dt (2, s, l, h) float32, y (2s, l, h, p))."""
    e, c, h, p, g, n = dims
    s, l = zxbcdt.shape[:2]
    xbc = conv_silu_fwd(zxbcdt[..., e:e + c], conv_w, conv_b)
    dt = softplus_dt(zxbcdt[..., e + c:], dt_bias)
    xs, B, C = _scan_inputs(xbc, dims)
    return xbc, dt, ssd_fwd(xs, dt.view(2 * s, l, h), A, B, C, D, dir_mode=2)


def _scan_inputs(xbc: Tensor, dims) -> tuple[Tensor, Tensor, Tensor]:
    """Views x (2s, l, h, p), B and C (2s, l, g, n) of a conv output (2, s, l, c)."""
    e, c, h, p, g, n = dims
    two, s, l, _ = xbc.shape
    xs, B, C = xbc.view(2 * s, l, c).split([e, g * n, g * n], dim=-1)
    return xs.unflatten(-1, (h, p)), B.unflatten(-1, (g, n)), C.unflatten(-1, (g, n))


def mixer_core_reference(acc, zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, w_g, dims, eps,
                         group_size) -> Tensor:
    """`MixerCore` as a chain of the separate autograd functions on the split views and a plain product (its twin
    in the tests): acc + gn W_gᵀ as a new tensor."""
    e, c, h, p, g, n = dims
    s, l, d = acc.shape
    z, xbc_raw, dt_raw = zxbcdt.split([e, c, h], dim=-1)
    xbc = conv_silu_bidirectional(xbc_raw, conv_w, conv_b)  # (2, s, l, c)
    dt = softplus_dt_reference(dt_raw, dt_bias)  # (2, s, l, h) float32
    xs, B, C = _scan_inputs(xbc.contiguous(), dims)
    y = ssd_scan_bidirectional(xs, dt.reshape(2 * s, l, h), A, B, C, D)  # (2s, l, h, p)
    gn = gated_norm_bidirectional(y.view(2, s, l, e), z, norm_w, eps, group_size)  # (s, l, 2e)
    return torch.addmm(acc.reshape(s * l, d), gn.view(s * l, 2 * e), w_g.t().to(gn.dtype)).view(s, l, d)


def fused_weights(merged: tuple[Tensor, ...], e: int, d: int) -> tuple[Tensor, ...]:
    """The fused inference path's weights (item 5 of the module docstring) from the merged ones
    (w_in, w_g, w_x, conv_w, conv_b, dt_bias, A, D, norm_w) → (w_in (2, width, d), w_out (2, e, d), w_x, conv_w
    tap-major, conv_b, dt_bias, A, D)."""
    w_in, w_g, w_x, conv_w, conv_b, dt_bias, A, D, norm_w = merged
    w_out = (w_g.view(d, 2, e) * norm_w[None]).permute(1, 2, 0)  # (2, e, d): g_d W'_dᵀ, the norm gains folded in
    # tap-major conv weights: the band-axis kernels load each tap's channels as one vector
    return w_in.view(2, -1, d), w_out, w_x, conv_taps_major(conv_w), conv_b, dt_bias, A, D


def block_forward(x: Tensor, merged: tuple[Tensor, ...], bias: Tensor | None, dims, prenorm_eps: float,
                  norm_eps: float, group_size: int, out: Tensor | None = None,
                  keep_conv_output: bool = False) -> Tensor:
    """The block with autograd (items 1-4 of the module docstring): x `(s, l, d)` → `(s, l, d)`, or written into
    `out` (`(*lead, l, d)`, any strides, as `residual.add_into`). merged = (w_in, w_g, w_x, conv_w, conv_b, dt_bias,
    A, D, norm_w) with w_in, w_g, w_x in the products' dtype; bias: the merge's. keep_conv_output: the conv output
    is kept for backward instead of recomputed there (faster, 2·c values per token more memory; same values)."""
    w_in, w_g, w_x, conv_w, conv_b, dt_bias, A, D, norm_w = merged
    e, c, h = dims[:3]
    s, l = x.shape[:2]
    # the pre-norm without its gain (folded into w_in) and the in-projection: (s, l, 2, e + c + h)
    zxbcdt = PreNormIn.apply(x, w_in, prenorm_eps).view(s, l, 2, e + c + h)
    merged_x = F.linear(x, w_x, bias)  # (s, l, d): the merge's x-terms and bias
    # + gn W_gᵀ (gn: both directions' gated-norm outputs side by side), summed into merged_x in the epilogue
    merged_x = MixerCore.apply(merged_x, zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, w_g, dims, norm_eps,
                               group_size, keep_conv_output)
    return merged_x + x if out is None else add_into(merged_x, x, out)


def block_inference(x: Tensor, fused: tuple[Tensor, ...], bias: Tensor | None, dims, prenorm_eps: float,
                    norm_eps: float, out: Tensor | None = None, x_scaled: Tensor | None = None,
                    scaled: tuple[Tensor, float] | None = None) -> Tensor:
    """The block without autograd (item 5 of the module docstring; the gated norm over all of d_inner): x
    `(s, l, d)` → `(s, l, d)`, or written into `out` as in `block_forward`. fused = `fused_weights(...)` with w_in,
    w_out, w_x in the products' dtype. x_scaled (shaped like x), when given, is taken as rms_scale(x, prenorm_eps)
    instead of computing it; scaled = (xn, eps') has the merge also write rms_scale(result, eps') into xn (shaped
    and strided like out)."""
    w_in, w_out, w_x, conv_w, conv_b, dt_bias, A, D = fused
    e, c, h, p, g, n = dims
    s, l, d = x.shape
    if x_scaled is None:
        x_scaled = rms_scale(x, prenorm_eps)  # the pre-norm without its gain (folded into w_in)
    xn = x_scaled.reshape(s * l, d).to(w_in.dtype)
    if l <= block_q_for(l):  # the band axis (one chunk): everything up to g in the scan's two kernels
        # the scan reads sequences (2s) with one stride: each direction's in-projection is its own product
        zx = torch.empty(2, s * l, w_in.shape[1], device=x.device, dtype=w_in.dtype)  # (2, s·l, e + c + h)
        with torch.autocast(device_type=x.device.type, enabled=False):
            for k in range(2):
                torch.mm(xn, w_in[k].t(), out=zx[k])
        z, xs, B, C, dt = zx.view(2 * s, l, -1).split([e, e, g * n, g * n, h], dim=-1)  # first s: forward
        gated, ss = ssd_fwd(xs.unflatten(-1, (h, p)), dt, A, B.unflatten(-1, (g, n)), C.unflatten(-1, (g, n)), D,
                            dir_mode=2, x_conv=(conv_w, conv_b), bc_conv=(conv_w, conv_b), dt_bias=dt_bias,
                            z=z.unflatten(-1, (h, p)))  # (2s, l, h, p), (2s, l, h) float32
        parts = torch.bmm(gated.view(2, s * l, e), w_out.to(gated.dtype))  # (2, s·l, d): g_d W'_dᵀ
    else:  # the time axis: one product for both directions
        zx = F.linear(xn, w_in.flatten(0, 1)).view(s, l, 2, -1)  # (s, l, 2, e + c + h)
        _, _, y = conv_scan(zx, conv_w, conv_b, dt_bias, A, D, dims)  # y (2s, l, h, p)
        z = zx.view(s * l, 2, -1)[..., :e].transpose(0, 1)  # (2, s·l, e)
        parts, ss = gated_proj(y.view(2, s * l, e), z, w_out.to(y.dtype))  # (2, s·l, d), (2, s·l)
    merged = F.linear(x, w_x, bias)  # (s, l, d): the merge's x-terms and bias
    return gated_merge_into(parts, ss.view(2, s * l, -1), merged, x, e, norm_eps, out, scaled)
