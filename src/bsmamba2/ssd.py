"""State-space duality (SSD), the scan inside Mamba2, in three plain-PyTorch forms that compute the same thing.

For each head h (scalar decay a_t = dt_t·A_h < 0) and sequence position t:

    state_t = exp(dt_t·A) · state_{t-1} + dt_t · x_t ⊗ B_t        state: (headdim, d_state)
    y_t     = state_t · C_t  (+ D · x_t)

Shapes (letters used in every einsum below):
    x  (b, l, h, p)   inputs per head, p = headdim
    dt (b, l, h)      positive step sizes (after softplus)
    A  (h,)           negative decay rates
    B, C (b, l, g, n) input/output projections, g groups shared by h/g heads each, n = d_state
    y  (b, l, h, p)

- `ssd_sequential`: the recurrence itself, one step at a time. Ground truth; slow.
- `ssd_quadratic`:  y = (L ∘ C Bᵀ) (dt·x) with L_ij = exp(Σ_{j<k≤i} dt_k A) for i ≥ j. No states; O(l²) memory.
                    Best for short sequences (the band axis, l = 62).
- `ssd_chunked`:    the quadratic form inside chunks of `chunk_size`, states passed between chunks. Linear in l;
                    any length (the last chunk may be partial). Used for the time axis.

All forms do their decay arithmetic (cumsum, exp) in float32, also under autocast.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _expand_groups(t: Tensor, heads: int) -> Tensor:
    """(b, l, g, n) → (b, l, h, n): each group serves h/g consecutive heads."""
    g = t.shape[2]
    if heads % g:
        raise ValueError(f"heads ({heads}) must be a multiple of groups ({g})")
    return t.repeat_interleave(heads // g, dim=2)


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half inputs (decays must not be computed in bf16), float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


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
    Bh, Ch = _expand_groups(B, h).to(cd), _expand_groups(C, h).to(cd)
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
    scores = torch.einsum("bihn,bjhn->bhij", _expand_groups(C, h).to(cd), _expand_groups(B, h).to(cd))
    xdt = x.to(cd) * dt.to(cd)[..., None]  # (b, l, h, p)
    y = torch.einsum("bhij,bjhp->bihp", L * scores, xdt)
    return _skip(y, x, D).to(x.dtype)


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                chunk_size: int = 256, initial_state: Tensor | None = None, return_final_state: bool = False):
    """Chunked SSD: quadratic form within chunks, states carried across chunk boundaries.

    Any length: the sequence is zero-padded to whole chunks (dt = 0 on padding, so it neither decays nor adds to
    the state) and the output cut back. A sequence no longer than `chunk_size` is one chunk of its own length.
    Returns y `(b, l, h, p)` [, final state `(b, h, p, n)`].
    """
    b, l, h, p = x.shape
    q = max(1, min(chunk_size, l))  # chunk length
    pad = (-l) % q
    cd = compute_dtype(x)
    Bh, Ch = _expand_groups(B, h).to(cd), _expand_groups(C, h).to(cd)
    xdt = x.to(cd) * dt.to(cd)[..., None]  # (b, l, h, p)
    a = dt.to(cd) * A.to(cd)  # (b, l, h) log-decay per step
    if pad:
        Bh, Ch, xdt = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)) for t in (Bh, Ch, xdt))
        a = torch.nn.functional.pad(a, (0, 0, 0, pad))
    c = (l + pad) // q
    Bh, Ch, xdt = (t.reshape(b, c, q, h, -1) for t in (Bh, Ch, xdt))  # (b, c, q, h, ·)
    a = a.reshape(b, c, q, h).permute(0, 3, 1, 2)  # (b, h, c, q)
    a_cum = torch.cumsum(a, dim=-1)  # (b, h, c, q)

    # 1. within each chunk: the quadratic form
    L = segment_decay(a)  # (b, h, c, i, j)
    scores = torch.einsum("bcihn,bcjhn->bhcij", Ch, Bh)
    y = torch.einsum("bhcij,bcjhp->bcihp", L * scores, xdt)

    # 2. each chunk's own contribution to the state at its end
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, h, c, q)
    chunk_states = torch.einsum("bcjhn,bhcj,bcjhp->bchpn", Bh, decay_to_end, xdt)

    # 3. pass states across chunks (sequential over chunks: linear in length)
    state = x.new_zeros(b, h, p, Bh.shape[-1], dtype=cd) if initial_state is None else initial_state.to(cd)
    chunk_decay = torch.exp(a_cum[..., -1])  # (b, h, c) total decay over each chunk
    entering = []
    for i in range(c):
        entering.append(state)
        state = chunk_decay[:, :, i, None, None] * state + chunk_states[:, i]
    prev = torch.stack(entering, dim=1)  # (b, c, h, p, n) state entering each chunk

    # 4. the entering state's contribution to every output of the chunk
    y = y + torch.einsum("bcihn,bchpn,bhci->bcihp", Ch, prev, torch.exp(a_cum))
    y = _skip(y.reshape(b, c * q, h, p)[:, :l], x, D).to(x.dtype)
    return (y, state) if return_final_state else y
