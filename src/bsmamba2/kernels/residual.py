"""The residual add of a block, written straight into the next pass's layout (Triton).

Plain twin: `torch.add(a.view(out.shape), b.view(out.shape), out=out)`. Between the time and band passes the latent
changes layout, `(b, k, t, d)` ↔ `(b, t, k, d)`, a permutation of whole rows of d contiguous values. PyTorch's
strided elementwise add writes such an `out` at about half the speed of a contiguous add; here every program
copies ROWS whole rows, each read and written as one contiguous run, and only the row's destination moves.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _add_rows_kernel(a_ptr, b_ptr, out_ptr, R, N, N1, N2, so0, so1, so2,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Rows r of a, b (R, N) contiguous: out[i0, i1, i2, :] = a[r] + b[r] with r = (i0·N1 + i1)·N2 + i2."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < R)[:, None] & (cols < N)[None, :]
    r64 = rows.to(tl.int64)
    src = r64[:, None] * N + cols[None, :]
    i2 = r64 % N2
    i1 = (r64 // N2) % N1
    i0 = r64 // (N2 * N1)
    dst = (i0 * so0 + i1 * so1 + i2 * so2)[:, None] + cols[None, :]
    total = tl.load(a_ptr + src, mask=mask, other=0.0).to(tl.float32) + tl.load(b_ptr + src, mask=mask,
                                                                                 other=0.0).to(tl.float32)
    tl.store(out_ptr + dst, total.to(out_ptr.dtype.element_ty), mask=mask)


def add_into(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """out = a + b, with a and b `(s, l, n)` and `out` `(*lead, l, n)` (at most two leading dims, any strides
    but unit stride along n): the sum of a's rows in order, written to out's rows. float32 arithmetic."""
    if out.dim() > 4 or out.stride(-1) != 1 or a.shape != b.shape or out.shape[-2:] != a.shape[1:] \
            or out.numel() != a.numel():
        raise ValueError(f"add_into shapes disagree: a {tuple(a.shape)}, b {tuple(b.shape)}, out {tuple(out.shape)}")
    a, b = a.contiguous(), b.contiguous()
    out4 = out.view((1,) * (4 - out.dim()) + tuple(out.shape))  # (n0, n1, l, n)
    _, n1, l, n = out4.shape
    rows = a.numel() // n
    if rows:
        block = triton.next_power_of_2(n)
        per = max(1, min(16, 4096 // block))
        _add_rows_kernel[(triton.cdiv(rows, per),)](a, b, out4, rows, n, n1, l, *out4.stride()[:3],
                                                    ROWS=per, BLOCK=block, num_warps=4)
    return out
