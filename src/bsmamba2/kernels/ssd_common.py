"""Pieces shared by the scan's kernels (`ssd_time`, `ssd_band`, `ssd_backward`, and the Gluon `ssd_time_sm90`,
`ssd_band_sm90`): `@triton.jit` helpers, and the host-side choice of tile sizes and product dtypes.

Directions: DIR_MODE 0 scans every sequence forward, 1 every sequence backward (position t read as L−1−t: the
backward half of a bidirectional block without flip copies), 2 the first `seqs_per_dir` sequences forward and the
rest backward (both directions of a block in one launch). A and D are `(ndir, heads)`.

Decay arithmetic (cumsum, exp) and accumulation are float32; matrix products take the inputs' dtype (bf16 on the
fast path, float32 with IEEE products otherwise). All kernels keep cumulative decays in base 2 (log2(e) folded into
A), so each exponential is a single exp2. The helpers that do scalar arithmetic only (`direction`, `chunk_rows`,
`head_bases`) are also compiled as Gluon functions by the sm_90 kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from bsmamba2 import switches


@triton.jit
def direction(s, seqs_per_dir, DIR_MODE: tl.constexpr):
    """(direction index d, whether program sequence s is scanned from its end) for DIR_MODE 0, 1 or 2."""
    d = s // seqs_per_dir
    if DIR_MODE == 0:
        reverse = s < 0
    elif DIR_MODE == 1:
        reverse = s >= 0
    else:
        reverse = d == 1
    return d, reverse


@triton.jit
def sequence_and_head(HEADS_FIRST: tl.constexpr):
    """(sequence, head) of a per-(sequence, head) program. HEADS_FIRST: the heads of one sequence are neighbouring programs
    (grid (heads, sequences)), so they run together and share the sequence's B and C tiles through the L2 cache."""
    if HEADS_FIRST:
        return tl.program_id(1), tl.program_id(0)
    return tl.program_id(0), tl.program_id(1)


@triton.jit
def head_bases(x_ptr, B_ptr, C_ptr, y_ptr, s, h, heads_per_group, sx_s, sx_h, sb_s, sb_g, sc_s, sc_g, sy_s, sy_h):
    """Of the time-axis forward scan's program (sequence s, head h): the start of its x, B, C (its head's
    group) and y. Scalar arithmetic only, so the Gluon kernel (`ssd_time_sm90`) calls it too."""
    g = h // heads_per_group
    s64 = s.to(tl.int64)
    return (x_ptr + s64 * sx_s + h * sx_h, B_ptr + s64 * sb_s + g * sb_g, C_ptr + s64 * sc_s + g * sc_g,
            y_ptr + s64 * sy_s + h * sy_h)


@triton.jit
def split_program_id(n):
    """(program id // n, program id % n) on a flat grid."""
    pid = tl.program_id(0)
    return pid // n, pid % n


@triton.jit
def chunk_rows(c, L, reverse, BLOCK_Q: tl.constexpr):
    """Of chunk c: the scan positions' offsets in the chunk, which are in range, and their memory positions t."""
    offs_q = tl.arange(0, BLOCK_Q)
    tau = c * BLOCK_Q + offs_q  # position in scan order
    mq = tau < L
    return offs_q, mq, tl.where(reverse, L - 1 - tau, tau)


LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def tile_mask(rows_ok, offs, SIZE: tl.constexpr, BLOCK: tl.constexpr):
    """Mask of a (rows, BLOCK) tile: the rows in range, and the columns below SIZE only where the tile is wider than
    the data (a compile-time choice: no per-element column test for the model's power-of-two headdim and d_state)."""
    if SIZE == BLOCK:
        return rows_ok[:, None]
    else:
        return rows_ok[:, None] & (offs < SIZE)[None, :]


@triton.jit
def ones_column(offs, DT: tl.constexpr):
    """A (len(offs), 16) tile in DT, ones in column 0 and zeros elsewhere: (g ∘ g) times it has each row's Σ g² in
    column 0. Summing g² as this product keeps every use of g a product operand, so g never needs a layout of its
    own (a conversion through shared memory per tile); `gated_proj` and the band-axis scan's gate use it."""
    return ((offs[:, None] * 0 + tl.arange(0, 16)[None, :]) == 0).to(DT)


def block_size(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def dot_precision(x: Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def dot_dtype(x: Tensor):
    """Operand dtype of the kernels' matrix products: the input's; float32 under Triton's CPU interpreter, whose
    bf16 products are wrong (Triton 3.9)."""
    if switches.interpreting():
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[x.dtype]
