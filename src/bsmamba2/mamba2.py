"""The Mamba2 mixer and the bidirectional block of BSMamba2, in plain PyTorch, with a switchable scan backend.

Parameter names and shapes follow `mamba_ssm.modules.mamba2.Mamba2` (in_proj, conv1d, dt_bias, A_log, D, norm,
out_proj) and the official BSMamba2 `MambaBlock` (forward_blocks.0.{norm,mixer}, backward_blocks.0.{norm,mixer},
linear), so official weights load without renaming.

Backends for the scan (`set_backend`, or the environment variable BSMAMBA2_BACKEND; both in `bsmamba2.switches`):
    "torch"  plain PyTorch (`bsmamba2.ssd`), any device
    "triton" fused GPU kernels (`bsmamba2.kernels`; the whole block through `bsmamba2.fused_block`), CUDA only
    "auto"   (default) "triton" for CUDA tensors when Triton and the kernels are importable, else "torch"
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bsmamba2 import cpu_compile, ssd, switches
from bsmamba2.config import Mamba2Config
from bsmamba2.functional import (causal_depthwise_conv, causal_depthwise_conv_channels_last, compute_dtype,
                                 rms_scale)
from bsmamba2.switches import get_backend, set_backend  # noqa: F401  (the backend's home; kept importable here)

log = logging.getLogger(__name__)

TORCH_CHUNK = 64  # chunk length of the plain-PyTorch scan
CPU_SLICE_ELEMENTS = 500_000  # elements of the widest per-slice activation in CPU inference (~2 MB float32)


def conv_for(x: Tensor):
    """The causal depthwise conv for x's device: on a CPU with oneDNN the channels-last conv2d (one pass), elsewhere
    the shifted sum (`functional.causal_depthwise_conv`, the plain form; the GPU's fast path has its own kernels).
    Under `torch.compile` the shifted sum too: Inductor fuses it with its neighbours, which an opaque oneDNN call
    would prevent (docs/perf-log.md, row 100). `is_compiling` is asked first: `torch.compile` cannot trace
    `mkldnn.is_available`, and a call to it would break the compiled block's graph in two at each mixer."""
    if x.device.type == "cpu" and not torch.compiler.is_compiling() and torch.backends.mkldnn.is_available():
        return causal_depthwise_conv_channels_last
    return causal_depthwise_conv


class RMSNorm(nn.Module):
    """mamba_ssm's RMSNorm: x · rsqrt(mean(x²) + eps) · weight, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(compute_dtype(x))
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(xf.dtype)
        return out.to(x.dtype)


class RMSNormGated(nn.Module):
    """Gated RMSNorm with the gate applied before normalizing (norm_before_gate=False), per group of channels."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        cd = compute_dtype(x)
        xf = x.to(cd) * F.silu(z.to(cd))
        g = xf.unflatten(-1, (-1, self.group_size))  # (..., groups, group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return (g.flatten(-2) * self.weight.to(cd)).to(x.dtype)


class Mamba2(nn.Module):
    """Mamba2 mixer: in_proj → [z, xBC, dt]; causal depthwise conv + SiLU on xBC; SSD scan; gated RMSNorm; out_proj.

    Input and output `(batch, length, d_model)`.
    """

    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, expand: int = 4, headdim: int = 64,
                 ngroups: int = 1, chunk_size: int = 256, A_init_range: tuple[float, float] = (1.0, 16.0),
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.headdim = d_model, d_state, d_conv, headdim
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(f"expand*d_model ({self.d_inner}) must be a multiple of headdim ({headdim})")
        self.nheads, self.ngroups, self.chunk_size = self.d_inner // headdim, ngroups, chunk_size
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=False)  # [z, xBC, dt]
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1)

        # mamba_ssm's initialisation: dt log-uniform in [dt_min, dt_max] stored through softplus⁻¹; A uniform in
        # A_init_range stored as log; D = 1.
        dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(*A_init_range)))
        self.D = nn.Parameter(torch.ones(self.nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # type: ignore[attr-defined]

        self.norm = RMSNormGated(self.d_inner, group_size=self.d_inner // ngroups)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    @classmethod
    def from_config(cls, d_model: int, cfg: Mamba2Config) -> "Mamba2":
        return cls(d_model, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, headdim=cfg.headdim,
                   ngroups=cfg.ngroups, chunk_size=cfg.chunk_size)

    def forward(self, u: Tensor) -> Tensor:
        b, l, _ = u.shape
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xBC = F.silu(conv_for(xBC)(xBC, self.conv1d.weight, self.conv1d.bias))
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        cd = compute_dtype(u)
        dt = F.softplus(dt.to(cd) + self.dt_bias.to(cd))  # (b, l, h), at least float32
        A = -torch.exp(self.A_log.to(cd))  # (h,)
        y = self.scan(x.unflatten(-1, (self.nheads, self.headdim)), dt, A,
                      B.unflatten(-1, (self.ngroups, self.d_state)), C.unflatten(-1, (self.ngroups, self.d_state)))
        y = self.norm(y.flatten(-2), z)  # (b, l, d_inner)
        return self.out_proj(y)

    def scan(self, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
        """SSD with skip: x (b, l, h, p), dt (b, l, h), A (h,), B/C (b, l, g, n) → (b, l, h, p)."""
        if switches.resolve_backend(x.device) == "triton":
            from bsmamba2.kernels import ssd_scan  # noqa: PLC0415

            return ssd_scan(x, dt, A, B, C, self.D, chunk_size=self.chunk_size)
        # The chunk length changes only speed, never the result: ~headdim balances the chunk-local quadratic
        # work (∝ chunk) against the state work (∝ headdim·d_state / chunk) on CPUs.
        return ssd.ssd_chunked(x, dt, A, B, C, self.D, chunk_size=min(self.chunk_size, TORCH_CHUNK))


class PreNormMamba2(nn.Module):
    """x + Mamba2(RMSNorm(x)): mamba_ssm's `Block` as the official model uses it (no MLP, unfused add+norm)."""

    def __init__(self, dim: int, cfg: Mamba2Config):
        super().__init__()
        self.norm = RMSNorm(dim, eps=1e-5)
        self.mixer = Mamba2.from_config(dim, cfg)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mixer(self.norm(x))


class BiMamba2Block(nn.Module):
    """Bidirectional Mamba2 along one axis: [fwd(x), flip(bwd(flip(x)))] → 1×1 ConvTranspose1d (2D→D) → + x.

    Input and output `(sequences, length, dim)`. Without autograd, `out` receives the result in place of a new
    tensor: shaped `(*lead, length, dim)` with the sequences split over its leading dimensions, any strides (e.g.
    `(b, k, t, d)` as a transposed view of the next pass's `(b, t, k, d)` input). The final residual add writes it,
    so a change of layout between the time and band passes costs no separate copy.

    `keep_conv_output` (training on the fast path only; never changes a value): keep the conv output for backward
    instead of recomputing it there, which is faster and costs memory (`memory.py` sets it where it fits).
    """

    def __init__(self, dim: int, cfg: Mamba2Config):
        super().__init__()
        self.forward_blocks = nn.ModuleList([PreNormMamba2(dim, cfg)])
        self.backward_blocks = nn.ModuleList([PreNormMamba2(dim, cfg)])
        self.linear = nn.ConvTranspose1d(2 * dim, dim, kernel_size=1)
        self.keep_conv_output = False

    @property
    def prenorm_eps(self) -> float:
        """eps of the pre-norm (RMSNorm) in front of both directions' mixers."""
        return self.forward_blocks[0].norm.eps

    def fuses_prenorm(self, x: Tensor) -> bool:
        """Whether `forward(x, scaled=...)` writes the next block's pre-norm in its own last pass (the fused
        inference path on the GPU), so that a caller gains by asking for it. Elsewhere it costs a pass."""
        fast = self._fast_block(x)
        return not torch.is_grad_enabled() and fast is not None and fast.fused_inference_applies(self)

    def _fast_block(self, x: Tensor):
        """The fast path's module (`bsmamba2.fused_block`) when the Triton backend serves x's device and computes
        this block's function there (`supports`: both directions in shared launches), else None."""
        if switches.resolve_backend(x.device) != "triton":
            return None
        from bsmamba2 import fused_block as fast  # noqa: PLC0415  (imports the kernels: only on the fast path)

        return fast if fast.supports(self) else None

    def forward(self, x: Tensor, out: Tensor | None = None, *, x_scaled: Tensor | None = None,
                scaled: tuple[Tensor, float] | None = None) -> Tensor:
        """x `(s, l, d)` → `(s, l, d)`, or written into `out`. Two hints for a chain of blocks without autograd:
        x_scaled, x · rsqrt(mean(x²) + eps) as a previous block wrote it (used by the fused GPU path, which then
        skips its own norm pass; ignored elsewhere); scaled = (xn, eps'): also write that scale of the result,
        with the next block's eps', into xn (shaped like out)."""
        if out is not None and (torch.is_grad_enabled() or out.shape[-2:] != x.shape[1:]
                                or math.prod(out.shape[:-2]) != x.shape[0]):
            raise ValueError(f"out= needs torch.no_grad() and a shape (*lead, {x.shape[1]}, {x.shape[2]}) with "
                             f"{x.shape[0]} sequences over lead, got {tuple(out.shape)}")
        if (x_scaled is not None or scaled is not None) and torch.is_grad_enabled():
            raise ValueError("x_scaled= and scaled= are for inference: call under torch.no_grad()")
        fast = self._fast_block(x)
        y = self._cpu_or_plain(x, out) if fast is None else fast.bimamba2_block_forward(self, x, out, x_scaled, scaled)
        if scaled is not None and not self.fuses_prenorm(x):  # the fused path's merge wrote it already
            scaled[0].copy_(rms_scale(y, scaled[1]).view(scaled[0].shape))
        return y

    def _cpu_or_plain(self, x: Tensor, out: Tensor | None) -> Tensor:
        if x.device.type == "cpu" and not torch.is_grad_enabled():
            # CPU inference: a few sequences at a time keeps every temporary small enough to stay in the
            # allocator's heap and the caches, instead of page-faulting hundreds of MB per elementwise op; under
            # `cpu_compile.enabled()` each slice runs through the compiled block
            step = max(1, CPU_SLICE_ELEMENTS // (x.shape[1] * self.forward_blocks[0].mixer.conv_dim))
            compiled = cpu_compile.active()
            if x.shape[0] > step or compiled:
                plain = (lambda part: cpu_compile.run_block(self, part)) if compiled else self._plain
                parts = [plain(part) for part in self._slices(x, step, same_shape=compiled)]
                y = parts[0] if len(parts) == 1 else torch.cat(parts)
                y = y[:x.shape[0]]
                return y if out is None else out.copy_(y.view(out.shape))
        return self._plain(x, out)

    @staticmethod
    def _slices(x: Tensor, step: int, same_shape: bool) -> list[Tensor]:
        """x `(s, l, d)` in slices of `step` sequences. With `same_shape` a shorter last slice is padded with zero
        sequences to the full step (the sequences are independent; the caller drops the padding's rows), so the
        compiled block sees one shape per axis whatever the batch, instead of compiling again for each remainder."""
        step = min(step, x.shape[0])
        parts = list(x.split(step))
        if same_shape and parts[-1].shape[0] < step:
            last = parts[-1]
            parts[-1] = torch.cat([last, last.new_zeros(step - last.shape[0], *last.shape[1:])])
        return parts

    def _plain(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        fwd = self.forward_blocks[0](x)
        bwd = self.backward_blocks[0](x.flip(1)).flip(1)
        both = torch.cat([fwd, bwd], dim=-1)  # (s, l, 2d)
        # a kernel-1 transposed conv is a linear map with weight (2d, d, 1) used as Wᵀ
        y = F.linear(both, self.linear.weight[:, :, 0].t(), self.linear.bias)
        return y + x if out is None else torch.add(y.reshape(out.shape), x.reshape(out.shape), out=out)


