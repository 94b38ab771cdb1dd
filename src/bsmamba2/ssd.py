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
- `ssd_chunked`:    the quadratic form inside chunks of `chunk_size`, the state passed from chunk to chunk, all
                    chunks at once in a few batched products. Linear in l; any length. What the model runs on CPUs.

All forms do their decay arithmetic (cumsum, exp) in float32, also under autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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

    Any length: the tail is padded to whole chunks with steps that change nothing (no decay, no input). The work
    within chunks is done for all chunks at once, as a few large batched products (what CPUs and exporters run
    fastest); only the state's hand-over from chunk to chunk is a loop, of one multiply-add per chunk:
      1. within each chunk, y = (L ∘ C Bᵀ)(dt·x), as `ssd_quadratic`, per head;
      2. each chunk's own final state, Σ_j exp(decay from j to the chunk's end) B_j ⊗ (dt_j x_j): one product per
         chunk for all heads of a group (their x side by side), kept as (n, heads·p);
      3. the state entering chunk k: the one entering chunk k−1 decayed over that chunk, plus that chunk's own;
      4. each position adds C_t · (entering state), decayed from the chunk's start: again one product per chunk.
    Memory is linear in length (chunk × length per head for the decay matrices). B and C are used per group
    (never copied per head): heads split as h = g·r, r heads per group.
    Returns y `(b, l, h, p)` [, final state `(b, h, p, n)`].
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if h % g:
        raise ValueError(f"heads ({h}) must be a multiple of groups ({g})")
    r = h // g
    q = max(1, min(chunk_size, l))  # chunk length
    k = -(-l // q)  # chunks
    cd = compute_dtype(x)

    def chunked(t: Tensor) -> Tensor:  # (b, l, ...) → (b, k, q, ...), zero steps appended
        if k * q > l:
            t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, k * q - l))
        return t.view(b, k, q, *t.shape[2:])

    a = chunked((dt.to(cd) * A.to(cd)).view(b, l, g, r)).permute(0, 3, 4, 1, 2)  # (b, g, r, k, q) log-decays
    cum = torch.cumsum(a, dim=-1)  # (b, g, r, k, q): decay from each chunk's start
    xdt = chunked((x.to(cd) * dt.to(cd)[..., None]).view(b, l, g, r, p))  # (b, k, q, g, r, p)
    Bc = chunked(B.to(cd)).permute(0, 3, 1, 2, 4)  # (b, g, k, q, n)
    Cc = chunked(C.to(cd)).permute(0, 3, 1, 2, 4)
    y = torch.empty(b, k, q, g, r, p, dtype=cd, device=x.device)  # the output, in (b, l, h, p) order
    y_g = y.permute(0, 3, 1, 2, 4, 5)  # (b, g, k, q, r, p): the same memory, indexed per group and chunk
    # 1. within chunks, per head; the scores C_t·B_j are shared by a group's heads
    scores = segment_decay(a) * (Cc @ Bc.transpose(-1, -2)).unsqueeze(2)  # (b, g, r, k, q, q)
    within = scores @ xdt.permute(0, 3, 4, 1, 2, 5)  # (b, g, r, k, q, p)
    y_g.copy_(within.permute(0, 1, 3, 4, 2, 5))
    carried = k > 1 or initial_state is not None or return_final_state
    if carried:
        cum_g = cum.permute(0, 1, 3, 4, 2)  # (b, g, k, q, r)
        # 2. each chunk's own state (the last chunk's only when it is asked for), (n, r·p) per group and chunk
        kk = k if return_final_state else k - 1
        to_end = torch.exp(cum_g[:, :, :kk, -1:] - cum_g[:, :, :kk])[..., None]  # (b, g, kk, q, r, 1)
        weighted = (xdt.permute(0, 3, 1, 2, 4, 5)[:, :, :kk] * to_end).flatten(-2)  # (b, g, kk, q, r·p)
        own = (Bc[:, :, :kk].transpose(-1, -2) @ weighted).view(b, g, kk, n, r, p)
        # 3. the states entering the chunks, (n, r, p) per group
        decay = torch.exp(cum_g[:, :, :, -1])[:, :, :, None, :, None]  # (b, g, k, 1, r, 1): over each chunk
        if initial_state is None:
            states = [own.new_zeros(b, g, n, r, p)]
        else:
            states = [initial_state.to(cd).view(b, g, r, p, n).permute(0, 1, 4, 2, 3)]
        for j in range(kk):
            states.append(torch.addcmul(own[:, :, j], states[j], decay[:, :, j]))
        entering = torch.stack(states, dim=2)  # (b, g, kk + 1, n, r, p)
        # 4. the entering state, decayed to each position (chunk 0 has none without an initial state)
        s0 = 0 if initial_state is not None else 1
        if s0 < k:
            carried_in = (Cc[:, :, s0:] @ entering[:, :, s0:k].flatten(-2)).view(b, g, k - s0, q, r, p)
            y_g[:, :, s0:].addcmul_(carried_in, torch.exp(cum_g[:, :, s0:])[..., None])
    y = y.view(b, k * q, h, p)[:, :l]  # (b, l, h, p)
    y = _skip(y, x, D).to(x.dtype)
    if return_final_state:
        return y, entering[:, :, k].permute(0, 1, 3, 4, 2).reshape(b, h, p, n)
    return y
