"""The fast path of `BiMamba2Block` (`bsmamba2.mamba2`): its parameters merged into the tensors that
`bsmamba2.kernels.block` takes, cached between inference calls, and the choice of path.

`kernels/` never sees a module: this module reads the block's parameters, merges them (the module docstring of
`kernels.block` says how and why), keeps the result with `bsmamba2.derived` while no parameter changes, and calls
the tensor functions `block_forward` (autograd) or `block_inference` (no autograd, fused; `BSMAMBA2_FUSED=0` turns
it off for A/B runs). Plain twin: `BiMamba2Block._plain`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bsmamba2 import switches
from bsmamba2.derived import derived, in_autocast_dtype
from bsmamba2.kernels import block as kblock


def supports(block) -> bool:
    """Whether `bimamba2_block_forward` computes exactly this block's function (standard layout, equal eps)."""
    f, b = block.forward_blocks[0], block.backward_blocks[0]
    mf, mb = f.mixer, b.mixer
    return (len(block.forward_blocks) == 1 and len(block.backward_blocks) == 1 and f.norm.eps == b.norm.eps
            and 1 <= mf.d_conv <= 4
            and mf.norm.eps == mb.norm.eps and mf.norm.group_size == mb.norm.group_size
            and all(getattr(mf, a) == getattr(mb, a) for a in ("d_inner", "conv_dim", "nheads", "headdim",
                                                                "ngroups", "d_state", "d_conv")))


def fused_inference_applies(block) -> bool:
    """Whether `bimamba2_block_forward` takes the fused inference path: no autograd, a gated norm over all of
    d_inner, and BSMAMBA2_FUSED not 0 (for A/B runs)."""
    mf = block.forward_blocks[0].mixer
    return not torch.is_grad_enabled() and mf.norm.group_size == mf.d_inner and switches.fused_inference()


def merged_weights(block) -> tuple[Tensor, ...]:
    """The fast path's weights from the block's parameters, in float32 (items 1 and 3 of `kernels.block`):
    (w_in, w_g, w_x, conv_w, conv_b, dt_bias, A, D, norm_w)."""
    f, b = block.forward_blocks[0], block.backward_blocks[0]
    mf, mb = f.mixer, b.mixer
    d = block.linear.weight.shape[1]
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


def _dims(block) -> tuple[int, int, int, int, int, int]:
    mf = block.forward_blocks[0].mixer
    return mf.d_inner, mf.conv_dim, mf.nheads, mf.headdim, mf.ngroups, mf.d_state


def bimamba2_block_forward(block, x: Tensor, out: Tensor | None = None, x_scaled: Tensor | None = None,
                           scaled: tuple[Tensor, float] | None = None) -> Tensor:
    """`BiMamba2Block.forward` on the fast path. x `(s, l, d)` → `(s, l, d)`, or written into `out` (see
    `BiMamba2Block`). On the fused inference path, x_scaled (shaped like x), when given, is taken as rms_scale(x)
    instead of computing it, and scaled = (xn, eps) has the merge write rms_scale(result, eps) into xn (shaped
    and strided like out). The other path ignores both (`BiMamba2Block.forward` writes xn for it)."""
    f = block.forward_blocks[0]
    mf = f.mixer
    dims, d = _dims(block), x.shape[-1]
    params = list(block.parameters())
    merged = derived(block, "fast", params, lambda: merged_weights(block))
    if fused_inference_applies(block):
        fused = derived(block, "fused", params, lambda: kblock.fused_weights(merged, dims[0], d))
        w = in_autocast_dtype(block, "fused", params, fused[:3], x.device.type)  # the products' dtype
        return kblock.block_inference(x, (*w, *fused[3:]), block.linear.bias, dims, f.norm.eps, mf.norm.eps, out,
                                      x_scaled, scaled)
    w = in_autocast_dtype(block, "fast", params, merged[:3], x.device.type)  # the products' dtype
    return kblock.block_forward(x, (*w, *merged[3:]), block.linear.bias, dims, f.norm.eps, mf.norm.eps,
                                mf.norm.group_size, out, block.keep_conv_output)
