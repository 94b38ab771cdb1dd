"""Fast forward of `BiMamba2Block`: both directions share every launch, and the layer's linear maps are merged.

The plain block computes, for x `(s, l, d)`,

    f = x + out_f(Mamba2_f(rms(x) · w_f)),   b = flip(x' + out_b(Mamba2_b(rms(x') · w_b))),  x' = flip(x)
    y = [f, b] Wmᵀ + bm + x                                   (the 1×1 ConvTranspose1d, 2d → d)

Here, with the same parameters and the same function:
    1. rms(x) once (both pre-norms have the same eps); the pre-norm gains are folded into the in-projections, and
       both directions' in-projections are one matrix product (d → 2·(d_inner + conv_dim + heads)).
    2. The backward direction never flips: its causal conv1d becomes anti-causal (taps t..t+3) and its scan reads
       positions L−1−τ (`ssd_scan_bidirectional`), so one conv pass and one scan launch serve both directions.
    3. out_proj and the 1×1 merge are folded:  [x + o_f, x + o_b] Wmᵀ = [g_f, g_b] W_gᵀ + x W_xᵀ with
       W_g = [Wm₁ᵀ·Wo_f, Wm₂ᵀ·Wo_b] (d × 2·d_inner), W_x = (Wm₁ + Wm₂)ᵀ: one product on the gated-norm
       outputs of both directions, which adds the small d × d product on x (and its bias) in its epilogue.
    4. conv1d + SiLU → scan → gated RMSNorm form one autograd node (`_MixerCore`), whose backward writes the
       gradients of the split views into shared buffers instead of concatenating them.
    5. Without autograd (`_fused_inference`, when the gated norm spans all of d_inner, as in the paper's model; the
       environment variable BSMAMBA2_FUSED=0 turns it off, for A/B runs), no normalized tensor goes through memory.
       The norm's row scale rstd commutes with the out-projection, so the products run on g = y·silu(z) (norm gains
       folded into the weights) and rstd is applied in the residual add:
           y = rstd_f · g_f W'_fᵀ + rstd_b · g_b W'_bᵀ + x W_xᵀ + bm + x.
       One-chunk sequences (the band axis): the scan kernel reads the in-projection in place, applies conv1d + SiLU
       to x (and, in the C·Bᵀ stage, to B and C) and the softplus to dt, and writes g and Σg² per head; the conv
       and gated-norm passes are gone. Long sequences (the time axis): the scan's loop is latency-bound, and each
       of these steps inside it cost more than its own pass (H100: 3.15 ms per call, +1.5 softplus, +1.4 gate,
       +4.8 conv of x), so conv, softplus and scan run as in training, and g is formed inside the out-projection
       (`gated_proj`), a Triton product that also sums g² (1.41-1.51 ms against 1.91 for the gated-norm pass and
       the cuBLAS product on an H200; 1.89-1.93 against 2.65 on an H100 before Σg² became a product).
       In a model's inference loop the merge also writes the next block's pre-norm rms_scale(out) beside out, from
       the rows it holds, and that block reads it instead of normalizing again (`x_scaled=`, `scaled=`).
The RMS scale, conv1d + SiLU, the softplus of dt, the scan, the gated RMSNorm and the residual add into the next
pass's layout are Triton kernels (`norm.py`, `conv.py`, `dt.py`, `ssd.py`, `residual.py`); the matrix products are
cuBLAS, but for the inference out-projection of long sequences (`gated_proj.py`). Nothing is compiled by
`torch.compile`, so new shapes (batch sizes, lengths) cost no recompilation. Without autograd the merged weights are
cached between calls (`bsmamba2.derived`).

Letters: s sequences, l length, d model dim, e = d_inner, c = conv_dim, h heads, p headdim, g groups, n d_state.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from bsmamba2.derived import derived, in_autocast_dtype
from bsmamba2.kernels.conv import conv_silu_bidirectional, conv_silu_bwd, conv_silu_fwd, conv_taps_major
from bsmamba2.kernels.dt import softplus_dt, softplus_dt_reference
from bsmamba2.kernels.gated_proj import gated_proj
from bsmamba2.kernels.norm import gated_norm_bidirectional, gated_norm_bwd, gated_norm_fwd, rms_scale
from bsmamba2.kernels.residual import add_into, gated_merge_into
from bsmamba2.kernels.ssd import block_q_for, ssd_bwd, ssd_fwd, ssd_scan_bidirectional


class _MixerCore(torch.autograd.Function):
    """conv1d + SiLU → SSD scan → gated RMSNorm of both directions, from the in-projection's output, as one autograd
    node: `(s, l, 2, e + c + h)` → `(s, l, 2e)`.

    The same function as `conv_silu_bidirectional`, `ssd_scan_bidirectional` and `gated_norm_bidirectional` chained
    on the split views (`_mixer_core_reference`). As one node, the backward writes the gradients of z, xBC and dt
    straight into one buffer shaped like the in-projection's output, and those of x, B and C into one buffer shaped
    like the conv output: autograd's split backward would concatenate them instead (one strided copy of each, ~4 ms
    per call at the paper's training batch).
    """

    @staticmethod
    def forward(ctx, zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, dims, eps, group_size):
        e = dims[0]
        s, l = zxbcdt.shape[:2]
        xbc, dt, y = _conv_scan(zxbcdt, conv_w, conv_b, dt_bias, A, D, dims)
        ctx.save_for_backward(zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, xbc, dt, y)
        ctx.dims, ctx.eps, ctx.group_size = dims, eps, group_size
        return gated_norm_fwd(y.view(2, s, l, e), zxbcdt[..., :e], norm_w, eps, group_size)

    @staticmethod
    def backward(ctx, dgn):
        zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, xbc, dt, y = ctx.saved_tensors
        e, c, h, p, g, n = ctx.dims
        s, l = zxbcdt.shape[:2]
        z, xbc_raw, _ = zxbcdt.split([e, c, h], dim=-1)
        dzx = torch.empty_like(zxbcdt)  # (s, l, 2, e + c + h): the in-projection output's gradient
        dz, draw, ddt_raw = dzx.split([e, c, h], dim=-1)
        dy, _, dnorm_w = gated_norm_bwd(dgn, y.view(2, s, l, e), z, norm_w, ctx.eps, ctx.group_size, dz=dz)
        dxbc = torch.empty_like(xbc)  # (2, s, l, c)
        dxs, dB, dC = _scan_inputs(dxbc, ctx.dims)
        xs, B, C = _scan_inputs(xbc, ctx.dims)
        _, ddt, dA, _, _, dD = ssd_bwd(dy.view(2 * s, l, h, p), xs, dt.view(2 * s, l, h), A, B, C, D, dir_mode=2,
                                        dx=dxs, dB=dB, dC=dC)
        _, dconv_w, dconv_b = conv_silu_bwd(dxbc, xbc_raw, conv_w, conv_b, draw=draw)
        # dt = softplus(u), u = dt_raw + dt_bias: du = ddt · sigmoid(u), and sigmoid(u) = 1 − exp(−dt)
        du = ddt.view(2, s, l, h) * -torch.expm1(-dt)  # (2, s, l, h) float32
        ddt_raw.copy_(du.permute(1, 2, 0, 3))
        return (dzx, dconv_w.to(conv_w.dtype), dconv_b.to(conv_b.dtype), du.sum((1, 2)).to(dt_bias.dtype),
                dA.to(A.dtype), dD.to(D.dtype), dnorm_w.to(norm_w.dtype), None, None, None)


def _conv_scan(zxbcdt: Tensor, conv_w, conv_b, dt_bias, A, D, dims) -> tuple[Tensor, Tensor, Tensor]:
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


def _mixer_core_reference(zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, dims, eps, group_size) -> Tensor:
    """`_MixerCore` as a chain of the separate autograd functions on the split views (its twin in the tests)."""
    e, c, h, p, g, n = dims
    s, l = zxbcdt.shape[:2]
    z, xbc_raw, dt_raw = zxbcdt.split([e, c, h], dim=-1)
    xbc = conv_silu_bidirectional(xbc_raw, conv_w, conv_b)  # (2, s, l, c)
    dt = softplus_dt_reference(dt_raw, dt_bias)  # (2, s, l, h) float32
    xs, B, C = _scan_inputs(xbc.contiguous(), dims)
    y = ssd_scan_bidirectional(xs, dt.reshape(2 * s, l, h), A, B, C, D)  # (2s, l, h, p)
    return gated_norm_bidirectional(y.view(2, s, l, e), z, norm_w, eps, group_size)  # (s, l, 2e)


def supports(block) -> bool:
    """Whether `bimamba2_block_forward` computes exactly this block's function (standard layout, equal eps)."""
    f, b = block.forward_blocks[0], block.backward_blocks[0]
    mf, mb = f.mixer, b.mixer
    return (len(block.forward_blocks) == 1 and len(block.backward_blocks) == 1 and f.norm.eps == b.norm.eps
            and 1 <= mf.d_conv <= 4
            and mf.norm.eps == mb.norm.eps and mf.norm.group_size == mb.norm.group_size
            and all(getattr(mf, a) == getattr(mb, a) for a in ("d_inner", "conv_dim", "nheads", "headdim",
                                                                "ngroups", "d_state", "d_conv")))


def _merged_weights(block, d: int) -> tuple[Tensor, ...]:
    """The fast path's weights from the block's parameters, in float32 (items 1 and 3 of the module docstring)."""
    f, b = block.forward_blocks[0], block.backward_blocks[0]
    mf, mb = f.mixer, b.mixer
    with torch.autocast(device_type=f.norm.weight.device.type, enabled=False):
        w_in = torch.cat([mf.in_proj.weight * f.norm.weight[None, :], mb.in_proj.weight * b.norm.weight[None, :]])
        wm = block.linear.weight[:, :, 0]  # (2d, d), used as [f, b] @ wm
        return (w_in,
                torch.cat([wm[:d].t() @ mf.out_proj.weight, wm[d:].t() @ mb.out_proj.weight], dim=1),  # w_g (d, 2e)
                (wm[:d] + wm[d:]).t(),  # w_x (d, d)
                torch.stack([mf.conv1d.weight[:, 0], mb.conv1d.weight[:, 0]]),  # conv_w (2, c, k)
                torch.stack([mf.conv1d.bias, mb.conv1d.bias]),  # conv_b (2, c)
                torch.stack([mf.dt_bias, mb.dt_bias]),  # dt_bias (2, h)
                -torch.exp(torch.stack([mf.A_log, mb.A_log]).float()),  # A (2, h)
                torch.stack([mf.D, mb.D]),  # D (2, h)
                torch.stack([mf.norm.weight, mb.norm.weight]))  # norm_w (2, e)


def _fused_weights(block, e: int, d: int) -> tuple[Tensor, ...]:
    """The fused inference path's weights (item 5 of the module docstring), derived from the merged ones."""
    w_in, w_g, w_x, conv_w, conv_b, dt_bias, A, D, norm_w = derived(block, "fast", list(block.parameters()),
                                                                     lambda: _merged_weights(block, d))
    w_out = (w_g.view(d, 2, e) * norm_w[None]).permute(1, 2, 0)  # (2, e, d): g_d W'_dᵀ, the norm gains folded in
    # tap-major conv weights: the one-chunk kernels load each tap's channels as one vector
    return w_in.view(2, -1, d), w_out, w_x, conv_taps_major(conv_w), conv_b, dt_bias, A, D


def _fused_inference(block, x: Tensor, out: Tensor | None, x_scaled: Tensor | None,
                     scaled: tuple[Tensor, float] | None) -> Tensor:
    """`bimamba2_block_forward` without autograd, as item 5 of the module docstring: x `(s, l, d)`; x_scaled and
    scaled as in `bimamba2_block_forward`."""
    f, b = block.forward_blocks[0], block.backward_blocks[0]
    mf = f.mixer
    s, l, d = x.shape
    e, c, h, p, g, n = mf.d_inner, mf.conv_dim, mf.nheads, mf.headdim, mf.ngroups, mf.d_state
    params = list(block.parameters())
    w_in, w_out, w_x, conv_w, conv_b, dt_bias, A, D = derived(block, "fused", params,
                                                               lambda: _fused_weights(block, e, d))
    w_in, w_out, w_x = in_autocast_dtype(block, "fused", params, (w_in, w_out, w_x), x.device.type)

    if x_scaled is None:
        x_scaled = rms_scale(x, f.norm.eps)  # the pre-norm without its gain (folded into w_in)
    xn = x_scaled.reshape(s * l, d).to(w_in.dtype)
    if l <= block_q_for(l):  # one chunk: everything up to g in the scan's two kernels
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
    else:  # one product for both directions (H100: 1.94 ms against 2.04 for two)
        zx = F.linear(xn, w_in.flatten(0, 1)).view(s, l, 2, -1)  # (s, l, 2, e + c + h)
        _, _, y = _conv_scan(zx, conv_w, conv_b, dt_bias, A, D, (e, c, h, p, g, n))  # y (2s, l, h, p)
        z = zx.view(s * l, 2, -1)[..., :e].transpose(0, 1)  # (2, s·l, e)
        parts, ss = gated_proj(y.view(2, s * l, e), z, w_out.to(y.dtype))  # (2, s·l, d), (2, s·l)
    merged = F.linear(x, w_x, block.linear.bias)  # (s, l, d): the merge's x-terms and bias
    return gated_merge_into(parts, ss.view(2, s * l, -1), merged, x, e, mf.norm.eps, out, scaled)


def fused_inference_applies(block) -> bool:
    """Whether `bimamba2_block_forward` takes the fused inference path (item 5): no autograd, a gated norm over all
    of d_inner, and BSMAMBA2_FUSED not 0 (for A/B runs)."""
    mf = block.forward_blocks[0].mixer
    return (not torch.is_grad_enabled() and mf.norm.group_size == mf.d_inner
            and os.environ.get("BSMAMBA2_FUSED", "1") != "0")


def bimamba2_block_forward(block, x: Tensor, out: Tensor | None = None, x_scaled: Tensor | None = None,
                           scaled: tuple[Tensor, float] | None = None) -> Tensor:
    """`BiMamba2Block.forward` on the fast path. x `(s, l, d)` → `(s, l, d)`, or written into `out` (see
    `BiMamba2Block`). On the fused inference path, x_scaled (shaped like x), when given, is taken as rms_scale(x)
    instead of computing it, and scaled = (xn, eps) has the merge write rms_scale(result, eps) into xn (shaped
    and strided like out). The other path ignores both (`BiMamba2Block.forward` writes xn for it)."""
    f, b = block.forward_blocks[0], block.backward_blocks[0]
    mf, mb = f.mixer, b.mixer
    s, l, d = x.shape
    e, c, h, p, g, n = mf.d_inner, mf.conv_dim, mf.nheads, mf.headdim, mf.ngroups, mf.d_state
    width = e + c + h  # one direction's in-projection: [z, xBC, dt]
    if fused_inference_applies(block):
        return _fused_inference(block, x, out, x_scaled, scaled)

    params = list(block.parameters())
    w_in, w_g, w_x, conv_w, conv_b, dt_bias, A, D, norm_w = derived(block, "fast", params,
                                                                     lambda: _merged_weights(block, d))
    w_in, w_g, w_x = in_autocast_dtype(block, "fast", params, (w_in, w_g, w_x), x.device.type)  # the GEMMs' dtype

    xn = rms_scale(x, f.norm.eps)  # (s, l, d): the pre-norm without its gain (folded into w_in)
    zxbcdt = F.linear(xn, w_in).view(s, l, 2, width)  # (s, l, 2, e + c + h)
    gn = _MixerCore.apply(zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, (e, c, h, p, g, n), mf.norm.eps,
                          mf.norm.group_size)  # (s, l, 2e): both directions' gated-norm outputs side by side
    merged = F.linear(x, w_x, block.linear.bias)  # (s, l, d): the merge's x-terms and bias
    merged.view(s * l, d).addmm_(gn.view(s * l, 2 * e), w_g.t().to(gn.dtype))  # + gn W_gᵀ, summed in the epilogue
    return merged + x if out is None else add_into(merged, x, out)
