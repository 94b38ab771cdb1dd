"""State-space duality (SSD), the scan inside Mamba2, in three plain-PyTorch forms that compute the same thing.

For each head h (scalar decay a_t = dt_t·A_h < 0) and sequence position t:

    state_t = exp(dt_t·A) · state_{t-1} + dt_t · x_t ⊗ B_t        state: (headdim, d_state)
    y_t     = state_t · C_t  (+ D · x_t)

Shapes (letters used in every einsum below):
    x  (b, l, h, p)   inputs per head, p = headdim
    dt (b, l, h)      positive step sizes (after softplus)
    A  (h,)           negative decay rates (so every log-decay dt·A ≤ 0)
    B, C (b, l, g, n) input/output projections, g groups shared by h/g heads each, n = d_state
    y  (b, l, h, p)

- `ssd_sequential`: the recurrence itself, one step at a time. Ground truth; slow.
- `ssd_quadratic`:  y = (L ∘ C Bᵀ) (dt·x) with L_ij = exp(Σ_{j<k≤i} dt_k A) for i ≥ j. No states; O(l²) memory.
                    Best for short sequences (the band axis, l = 62).
- `ssd_chunked`:    the quadratic form inside chunks of `chunk_size`, the state passed from chunk to chunk.
                    Linear in l; any length (the last chunk may be partial). What the model runs.

All forms do their decay arithmetic (cumsum, exp) in float32, also under autocast.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bsmamba2.functional import compute_dtype, expand_groups


def _skip(y: Tensor, x: Tensor, D: Tensor | None) -> Tensor:
    if D is None:
        return y
    D = D.to(y.dtype)
    return y + (D[:, None] if D.dim() == 1 else D.view(x.shape[2], x.shape[3])) * x.to(y.dtype)


def ssd_sequential(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   initial_state: Tensor | None = None, return_final_state: bool = False):
    """The SSD recurrence step by step (ground truth). Returns y `(b, l, h, p)` [, final state `(b, h, p, n)`]."""
    b, l, h, p = x.shape
    cd = compute_dtype(x)
    Bh, Ch = expand_groups(B, h).to(cd), expand_groups(C, h).to(cd)
    xf, dtf, Af = x.to(cd), dt.to(cd), A.to(cd)
    state = x.new_zeros(b, h, p, Bh.shape[-1], dtype=cd) if initial_state is None else initial_state.to(cd)
    ys = []
    for t in range(l):
        decay = torch.exp(dtf[:, t] * Af)  # (b, h)
        state = decay[..., None, None] * state + (dtf[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(b, 0, h, p)
    y = _skip(y, x, D).to(x.dtype)
    return (y, state) if return_final_state else y


def segment_decay(a: Tensor) -> Tensor:
    """L[..., i, j] = exp(Σ_{j<k≤i} a_k) for i ≥ j, else 0.  `a`: (..., l) → (..., l, l), float32."""
    cum = torch.cumsum(a.to(compute_dtype(a)), dim=-1)
    diff = cum[..., :, None] - cum[..., None, :]  # (..., i, j)
    causal = torch.ones(a.shape[-1], a.shape[-1], dtype=torch.bool, device=a.device).tril()
    return torch.exp(diff.masked_fill(~causal, float("-inf")))


def ssd_quadratic(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None) -> Tensor:
    """The masked (attention-like) form: y_i = Σ_{j≤i} L_ij (C_i·B_j) dt_j x_j. Returns y `(b, l, h, p)`."""
    h, cd = x.shape[2], compute_dtype(x)
    L = segment_decay((dt.to(cd) * A.to(cd)).transpose(1, 2))  # (b, h, i, j)
    scores = torch.einsum("bihn,bjhn->bhij", expand_groups(C, h).to(cd), expand_groups(B, h).to(cd))
    xdt = x.to(cd) * dt.to(cd)[..., None]  # (b, l, h, p)
    y = torch.einsum("bhij,bjhp->bihp", L * scores, xdt)
    return _skip(y, x, D).to(x.dtype)


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                chunk_size: int = 256, initial_state: Tensor | None = None, return_final_state: bool = False):
    """Chunked SSD: the quadratic form within each chunk, the state carried from chunk to chunk.

    Any length: the last chunk may be shorter. Chunks are visited in order (a loop over l / chunk_size), so only one
    chunk's (chunk × chunk) decay matrix exists at a time and memory stays linear in length. B and C are used per
    group (never copied per head): heads split as h = g·r, r heads per group.
    Returns y `(b, l, h, p)` [, final state `(b, h, p, n)`].
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if h % g:
        raise ValueError(f"heads ({h}) must be a multiple of groups ({g})")
    r = h // g
    q = max(1, min(chunk_size, l))  # chunk length
    cd = compute_dtype(x)
    a = (dt.to(cd) * A.to(cd)).view(b, l, g, r).permute(0, 2, 3, 1)  # (b, g, r, l) log-decay per step
    xdt = (x.to(cd) * dt.to(cd)[..., None]).view(b, l, g, r, p).permute(0, 2, 3, 1, 4).contiguous()  # (b, g, r, l, p)
    Bt, Ct = B.to(cd).transpose(1, 2), C.to(cd).transpose(1, 2)  # (b, g, l, n)
    state = None if initial_state is None else initial_state.to(cd).view(b, g, r, p, n)
    ys = []
    for s in range(0, l, q):
        e = min(s + q, l)
        a_i, x_i, B_i, C_i = a[..., s:e], xdt[:, :, :, s:e], Bt[:, :, s:e], Ct[:, :, s:e]
        cum = torch.cumsum(a_i, dim=-1)  # (b, g, r, m) decay from the chunk start
        # within the chunk: y_t = Σ_{j≤t} exp(Σ_{j<k≤t} a_k) (C_t·B_j) dt_j x_j, scores shared by a group's heads.
        # `segment_decay` without its -inf mask: above the diagonal cum_t - cum_j ≥ 0 (a ≤ 0) is clamped to 0 and
        # the causal mask goes on the scores instead (one matrix per group, not per head; exp of -inf is slow on CPUs)
        decay = torch.exp((cum[..., :, None] - cum[..., None, :]).clamp_(max=0))  # (b, g, r, m, m)
        scores = (C_i @ B_i.transpose(-1, -2)).tril_()  # (b, g, m, m), zero above the diagonal
        y_i = (decay * scores.unsqueeze(2)) @ x_i  # (b, g, r, m, p)
        if state is not None:  # the state entering the chunk, decayed to each position
            y_i = y_i + torch.exp(cum)[..., None] * (C_i.unsqueeze(2) @ state.transpose(-1, -2))
        ys.append(y_i)
        if e == l and not return_final_state:
            break
        # state at the chunk end: the entering state decayed over the chunk, plus the chunk's own inputs
        own = (x_i * torch.exp(cum[..., -1:] - cum)[..., None]).transpose(-1, -2) @ B_i.unsqueeze(2)  # (b,g,r,p,n)
        state = own if state is None else torch.exp(cum[..., -1])[..., None, None] * state + own
    y = torch.cat(ys, dim=3).permute(0, 3, 1, 2, 4).reshape(b, l, h, p)  # (b, l, h, p)
    y = _skip(y, x, D).to(x.dtype)
    if return_final_state:
        return y, state.reshape(b, h, p, n)
    return y
