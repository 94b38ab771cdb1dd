"""Two-direction depthwise conv1d + SiLU kernels (forward and backward) against the plain twin:
`F.conv1d` on the sequence (direction 0) and on the flipped sequence, flipped back (direction 1), then SiLU, in
float64 on fresh random inputs.

Without CUDA the kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1, set here before Triton is
imported) at tiny sizes.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

from bsmamba2.kernels import conv  # noqa: E402
from bsmamba2.kernels.conv import conv_silu_bidirectional, conv_silu_bwd  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    """‖a − b‖ / ‖b‖ in float64; complex values compared whole (real and imaginary parts), not cast to real."""
    a, b = (torch.view_as_real(t) if t.is_complex() else t for t in (a, b))
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def plain_conv_silu(raw, w, b):
    """raw (s, l, 2, c), w (2, c, k), b (2, c) → (2, s, l, c): the plain mixer's causal conv, direction 1 on the
    flipped sequence, flipped back."""
    l, c, k = raw.shape[1], raw.shape[3], w.shape[-1]
    outs = []
    for d in range(2):
        xr = raw[:, :, d].transpose(1, 2)  # (s, c, l)
        xr = xr.flip(-1) if d else xr
        o = F.silu(F.conv1d(xr, w[d][:, None], b[d], padding=k - 1, groups=c)[..., :l])
        outs.append((o.flip(-1) if d else o).transpose(1, 2))
    return torch.stack(outs)


def strided_raw(s, l, c, gen, dtype=torch.float32):
    """(s, l, 2, c) view of a wider (s, l, 2c + 7) in-projection output, as the block reads it."""
    zx = torch.randn(s, l, 2 * c + 7, generator=gen, dtype=dtype).to(DEV)
    return zx[..., 3:3 + 2 * c].unflatten(-1, (2, c))


# (s, l, c, k): l < k, c not a multiple of the channel block, s not a multiple of the sequences per program
CASES = [
    (3, 2, 5, 4),
    (1, 1, 3, 2),
    (9, 37, 24, 4),
    (2, 9, 130, 3),
    (5, 21, 40, 3),
    (2, 33, 17, 1),
    (10, 6, 9, 2),
    (2, 19, 256, 4),  # channels a whole number of channel blocks
]


@pytest.mark.parametrize("s,l,c,k", CASES)
def test_conv_silu_bwd_matches_plain(s, l, c, k):
    gen = torch.Generator().manual_seed(1000 * k + 10 * s + l)
    raw = strided_raw(s, l, c, gen)
    assert raw.storage_offset() == 3 and raw.stride(2) == c  # a view of the wider in-projection
    w = torch.randn(2, c, k, generator=gen).to(DEV)
    b = torch.randn(2, c, generator=gen).to(DEV)
    dout = torch.randn(2, s, l, c, generator=gen).to(DEV)

    draw, dw, db = conv_silu_bwd(dout, raw, w, b)
    assert draw.shape == (s, l, 2, c) and draw.dtype == raw.dtype
    assert dw.dtype == torch.float32 and db.dtype == torch.float32

    r64, w64, b64 = (t.double().requires_grad_() for t in (raw.detach(), w, b))
    ref = plain_conv_silu(r64, w64, b64)
    g_raw, g_w, g_b = torch.autograd.grad((ref * dout.double()).sum(), [r64, w64, b64])
    assert rel(draw, g_raw) < 1e-5
    assert rel(dw, g_w) < 1e-5
    assert rel(db, g_b) < 1e-5

    # through autograd, with a strided leaf-derived raw and a non-contiguous upstream gradient
    zx = raw.detach().clone().requires_grad_()
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    out = conv_silu_bidirectional(zx, wg, bg)
    assert rel(out, ref.detach()) < 1e-5
    go = dout.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    fast = torch.autograd.grad((out * go).sum(), [zx, wg, bg])
    for a, r in zip(fast, (g_raw, g_w, g_b)):
        assert rel(a, r) < 1e-5


@pytest.mark.parametrize("s,l,c,k", [(3, 13, 40, 4), (2, 7, 9, 3)])
def test_conv_silu_weight_in_either_memory_order(s, l, c, k):
    """The conv kernels read the weight through its strides: stored tap-major (as the fused block caches it), forward
    and the input gradient are exactly what the channel-major weight gives."""
    from bsmamba2.kernels.conv import conv_silu_fwd, conv_taps_major

    gen = torch.Generator().manual_seed(7 * c + k)
    raw = strided_raw(s, l, c, gen)
    w = torch.randn(2, c, k, generator=gen).to(DEV)
    b = torch.randn(2, c, generator=gen).to(DEV)
    dout = torch.randn(2, s, l, c, generator=gen).to(DEV)
    wt = conv_taps_major(w)
    assert torch.equal(wt, w) and wt.stride(1) == 1
    assert torch.equal(conv_silu_fwd(raw, wt, b), conv_silu_fwd(raw, w, b))
    (draw_t, dw_t, db_t), (draw, dw, db) = conv_silu_bwd(dout, raw, wt, b), conv_silu_bwd(dout, raw, w, b)
    assert torch.equal(draw_t, draw)
    assert rel(dw_t, dw) < 1e-6 and rel(db_t, db) < 1e-6  # float32 atomics: the summation order may differ


def test_conv_silu_bwd_many_sequence_blocks(monkeypatch):
    """Weight-gradient atomics from several programs along the sequence and channel axes: programs of 2 sequences,
    the last one short, and channel blocks of 8."""
    monkeypatch.setattr(conv, "_BWD_MIN_ROWS", 80)
    monkeypatch.setattr(conv, "_BWD_BLOCK_C", 8)
    assert conv._bwd_seqs_per_program(40) == 2
    s, l, c, k = 5, 40, 20, 4
    gen = torch.Generator().manual_seed(7)
    raw = strided_raw(s, l, c, gen)
    w = torch.randn(2, c, k, generator=gen).to(DEV)
    b = torch.randn(2, c, generator=gen).to(DEV)
    dout = torch.randn(2, s, l, c, generator=gen).to(DEV)
    draw, dw, db = conv_silu_bwd(dout, raw, w, b)
    r64, w64, b64 = (t.double().requires_grad_() for t in (raw, w, b))
    g = torch.autograd.grad((plain_conv_silu(r64, w64, b64) * dout.double()).sum(), [r64, w64, b64])
    for a, r in zip((draw, dw, db), g):
        assert rel(a, r) < 1e-5


def test_conv_silu_bwd_empty_and_bad_k():
    raw = torch.randn(0, 4, 2, 3, device=DEV)
    draw, dw, db = conv_silu_bwd(torch.randn(2, 0, 4, 3, device=DEV), raw, torch.randn(2, 3, 2, device=DEV),
                                 torch.randn(2, 3, device=DEV))
    assert draw.shape == (0, 4, 2, 3) and not dw.any() and not db.any()
    with pytest.raises(ValueError):
        conv_silu_bwd(torch.randn(2, 1, 4, 3, device=DEV), torch.randn(1, 4, 2, 3, device=DEV),
                      torch.randn(2, 3, 5, device=DEV), torch.randn(2, 3, device=DEV))
