"""Fast path (Triton kernels) against the plain-PyTorch path: forward and gradients on fresh random inputs.

Without CUDA the kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1, set here before Triton is
imported) at tiny sizes. With CUDA the `gpu` tests run the kernels compiled, at model size, and the official
fixture through the fast path.
"""

import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("BSMAMBA2_SSD_BLOCK", "16")  # several chunks at tiny lengths

triton = pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

from bsmamba2 import kernels, switches  # noqa: E402
from bsmamba2.config import BSMamba2Config, Mamba2Config  # noqa: E402
from bsmamba2.fused_block import bimamba2_block_forward  # noqa: E402
from bsmamba2.kernels.ssd import (SSDScan, block_q_for, causal_cb, causal_cb_reference, ssd_bwd,  # noqa: E402
                                  ssd_fwd, ssd_scan)
from bsmamba2.mamba2 import BiMamba2Block  # noqa: E402
from bsmamba2.ssd import ssd_chunked, ssd_sequential  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    """‖a − b‖ / ‖b‖ in float64; complex values compared whole (real and imaginary parts), not cast to real."""
    a, b = (torch.view_as_real(t) if t.is_complex() else t for t in (a, b))
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def test_rel_compares_complex_values_whole():
    ref = torch.tensor([1 + 1j, 2 - 1j], dtype=torch.complex64)
    assert rel(ref, ref) == 0
    assert rel(ref.real + 0j, ref) == pytest.approx(2**0.5 / 7**0.5)  # same real parts: the imaginary ones count


def random_scan_inputs(s, l, h, p, g, n, ndir, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(s, l, h, p, generator=gen)
    dt = F.softplus(torch.randn(s, l, h, generator=gen) - 1.0)
    A = -(0.05 + 2 * torch.rand(ndir, h, generator=gen))
    B = torch.randn(s, l, g, n, generator=gen)
    C = torch.randn(s, l, g, n, generator=gen)
    D = torch.randn(ndir, h, generator=gen)
    return [t.to(DEV) for t in (x, dt, A, B, C, D)]


def reference_scan(x, dt, A, B, C, D, dir_mode):
    """Plain path in float64: forward sequences as they are, backward ones flipped, scanned, flipped back."""
    s = x.shape[0]
    halves = [(0, s // 2, False), (s // 2, s, True)] if dir_mode == 2 else [(0, s, dir_mode == 1)]
    outs = []
    for k, (lo, hi, rev) in enumerate(halves):
        f = (lambda t: t.flip(1)) if rev else (lambda t: t)
        y = ssd_chunked(f(x[lo:hi]), f(dt[lo:hi]), A[k], f(B[lo:hi]), f(C[lo:hi]), D[k], chunk_size=32)
        outs.append(f(y))
    return torch.cat(outs)


def check_scan(s, l, h, p, g, n, dir_mode, dtype, seed, tol):
    ins = random_scan_inputs(s, l, h, p, g, n, 2 if dir_mode == 2 else 1, seed)
    dy = torch.randn(s, l, h, p, device=DEV, generator=None)
    fast = [(t.to(dtype) if t.dim() == 4 else t).clone().requires_grad_() for t in ins]
    y = SSDScan.apply(*fast, dir_mode)
    assert y.dtype == dtype and y.shape == (s, l, h, p)
    (y.float() * dy).sum().backward()
    ref = [t.double().requires_grad_() for t in ins]
    yr = reference_scan(*ref, dir_mode)
    (yr * dy.double()).sum().backward()
    assert torch.isfinite(y).all()
    errors = {"y": rel(y, yr)} | {name: rel(a.grad, b.grad) for name, a, b in zip("x dt A B C D".split(), fast, ref)}
    assert max(errors.values()) <= tol, errors


# the backward's chunk kernel: dB and dC summed over each group's heads inside it, or per head and summed after
GROUPED = pytest.mark.parametrize("grouped", ["1", "0"], ids=["grouped", "per_head"])


@GROUPED
@pytest.mark.parametrize("dir_mode", [0, 1, 2])
@pytest.mark.parametrize("length", [13, 45])  # one chunk (the band axis); several chunks with a partial last one
def test_scan_forward_and_gradients_float32(dir_mode, length, grouped, monkeypatch):
    monkeypatch.setenv("BSMAMBA2_SSD_BWD_GROUPED", grouped)
    if DEV == "cuda":
        length *= 20  # 260 / 900: several 64-step chunks
    check_scan(2 if dir_mode == 2 else 1, length, 2, 8, 1, 16, dir_mode, torch.float32, seed=length + dir_mode,
               tol=1e-3 if DEV == "cuda" else 1e-4)


@GROUPED
@pytest.mark.parametrize("length", [11, 21])  # one chunk (the C Bᵀ tile from its own kernel); several chunks
def test_scan_groups_and_odd_sizes(length, grouped, monkeypatch):
    """Two groups of two heads; headdim and d_state not powers of two (masked tiles)."""
    monkeypatch.setenv("BSMAMBA2_SSD_BWD_GROUPED", grouped)
    if DEV == "cuda":
        length *= 3
    check_scan(2, length, 4, 6, 2, 10, 2, torch.float32, seed=5, tol=1e-3 if DEV == "cuda" else 1e-4)


@pytest.mark.parametrize("dir_mode", [0, 1, 2])
def test_causal_cb_matches_reference(dir_mode):
    """The band axis's C Bᵀ stage: scan order (reversed sequences flipped), zero above the diagonal and past L."""
    gen = torch.Generator().manual_seed(dir_mode)
    s, l, g, n = 4, 13 if DEV == "cpu" else 62, 2, 10
    B, C = (torch.randn(s, l + 3, g, n, generator=gen)[:, 2:l + 2].to(DEV) for _ in range(2))  # strided views
    G = causal_cb(B, C, dir_mode)
    ref = causal_cb_reference(B.double(), C.double(), dir_mode)
    assert G.shape == (s, g, block_q_for(l), block_q_for(l))
    assert rel(G, ref) < (1e-3 if DEV == "cuda" else 1e-6)
    assert (G[..., l:, :] == 0).all() and (G[..., :, l:] == 0).all()


@GROUPED
def test_scan_bfloat16(grouped, monkeypatch):
    monkeypatch.setenv("BSMAMBA2_SSD_BWD_GROUPED", grouped)
    check_scan(2, 40, 2, 16, 1, 16, 2, torch.bfloat16, seed=7, tol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("length", [13, 45])
def test_scan_forward_16bit_with_vanishing_steps(dtype, length):
    """The band-axis kernel (length 13, one chunk) folds the skip term D x into its product as (D / dt)(x dt) where
    the operand dtype can hold D / dt (bf16, float32) and starts from D x where it cannot (float16); the time-axis
    kernel (45) always starts from D x. Steps of exactly 0 and 1e-20 (a softplus that underflowed) must still give D x
    there, with no inf or NaN."""
    x, dt, A, B, C, D = random_scan_inputs(2, length, 2, 16, 1, 16, 2, seed=11)
    dt[:, ::5] = 0.0
    dt[:, 1::7] = 1e-20
    y = ssd_fwd(x.to(dtype), dt, A, B.to(dtype), C.to(dtype), D, dir_mode=2)
    ref = reference_scan(*(t.double() for t in (x, dt, A, B, C, D)), dir_mode=2)
    assert torch.isfinite(y).all()
    assert rel(y, ref) < 2e-2


@pytest.mark.parametrize("band", [True, False])  # the band-axis forward's flat grid; the time-axis kernels' order
def test_scan_sequence_major_grid(monkeypatch, band):
    """The kernels' grids for more sequences than the grid's second dimension holds give the same result."""
    monkeypatch.setenv("BSMAMBA2_SSD_HEADS_FIRST", "0")
    length = (13 if band else 70) if DEV == "cpu" else (50 if band else 700)
    check_scan(2, length, 2, 16, 1, 16, 2, torch.float32, seed=4, tol=1e-3 if DEV == "cuda" else 1e-4)


@GROUPED
@pytest.mark.parametrize("length", [13, 45])  # one chunk; several
def test_scan_backward_writes_head_sums_into_strided_outputs(length, grouped, monkeypatch):
    """ssd_bwd's dB/dC outputs: the head sums land in strided views of another dtype, as the mixer's buffer holds
    them, equal to the float32 sums it returns otherwise; nothing outside the views is touched."""
    monkeypatch.setenv("BSMAMBA2_SSD_BWD_GROUPED", grouped)
    x, dt, A, B, C, D = random_scan_inputs(2, length, 4, 8, 2, 16, 2, seed=9)
    dy = torch.randn_like(x)
    ref = ssd_bwd(dy, x, dt, A, B, C, D, 2)
    buf = torch.zeros(2, length, 3 * 2 * 16, device=DEV, dtype=torch.float64)  # [dB, dC, untouched] per row
    dB, dC = (buf[..., k * 32:(k + 1) * 32].unflatten(-1, (2, 16)) for k in range(2))
    got = ssd_bwd(dy, x, dt, A, B, C, D, 2, dB=dB, dC=dC)
    assert got[3].data_ptr() == dB.data_ptr() and got[4].data_ptr() == dC.data_ptr()
    assert rel(dB, ref[3]) < 1e-6 and rel(dC, ref[4]) < 1e-6
    assert (buf[..., 64:] == 0).all()
    with pytest.raises(ValueError, match="shaped like B"):
        ssd_bwd(dy, x, dt, A, B, C, D, 2, dB=dB[:, :length - 1])


@pytest.mark.parametrize("split", ["1", "0"], ids=["two_loops", "one_loop"])  # the grouped kernel's S_c terms
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dir_mode, length", [(2, 13), (2, 45), (1, 37)])  # one chunk; several, partial last
def test_grouped_and_per_head_backward_agree(dir_mode, length, dtype, split, monkeypatch):
    """The grouped chunk kernel (three heads per group, two groups, dB/dC summed inside it) and the per-head one
    (per-head buffers summed after it) give the same gradients, all six, for the same inputs."""
    monkeypatch.setenv("BSMAMBA2_SSD_BWD_SPLIT", split)
    x, dt, A, B, C, D = random_scan_inputs(2, length, 6, 8, 2, 16, 2 if dir_mode == 2 else 1, seed=length)
    x, B, C = (t.to(dtype) for t in (x, B, C))
    dy = torch.randn_like(x)
    got = {}
    for grouped in ("1", "0"):
        monkeypatch.setenv("BSMAMBA2_SSD_BWD_GROUPED", grouped)
        got[grouped] = ssd_bwd(dy, x, dt, A, B, C, D, dir_mode)
    for name, a, b in zip("dx ddt dA dB dC dD".split(), got["1"], got["0"]):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        # bf16: the per-head kernel rounds each head's dB, dC to bf16 before the sum, and on the GPU the products
        # take bf16 operands (the interpreter's are float32: the other gradients agree to float32 rounding there)
        loose = dtype == torch.bfloat16 and (name in ("dB", "dC") or DEV == "cuda")
        assert rel(a, b) < (1e-2 if loose else 1e-5), (name, rel(a, b))


def test_ssd_scan_entry_point_matches_sequential():
    x, dt, A, B, C, D = random_scan_inputs(2, 30, 2, 8, 1, 16, 1, seed=11)
    for reverse in (False, True):
        y = ssd_scan(x, dt, A[0], B, C, D[0], chunk_size=256, reverse=reverse)
        f = (lambda t: t.flip(1)) if reverse else (lambda t: t)
        ref = f(ssd_sequential(*(f(t).double() for t in (x, dt)), A[0].double(), f(B).double(), f(C).double(),
                               D[0].double()))
        assert rel(y, ref) < 1e-5


@pytest.mark.parametrize("seqs", [3, 11])  # fewer, and more, sequences than one backward program sums
@pytest.mark.parametrize("k,c", [(4, 40), (3, 300), (1, 24)])  # 300: two channel blocks of the forward, one partial
@pytest.mark.parametrize("l", [21, 3, 1])  # not a multiple of the forward's rows per step; shorter than its look-ahead
def test_conv_silu_both_directions_matches_conv1d(seqs, k, c, l):
    from bsmamba2.kernels.conv import conv_silu_bidirectional

    raw = torch.randn(seqs, l, 2, c, device=DEV, requires_grad=True)
    w = torch.randn(2, c, k, device=DEV, requires_grad=True)
    b = torch.randn(2, c, device=DEV, requires_grad=True)
    out = conv_silu_bidirectional(raw, w, b)
    go = torch.randn_like(out)
    fast = torch.autograd.grad((out * go).sum(), [raw, w, b])
    ref = []
    for d in range(2):  # the plain mixer's causal conv; direction 1 on the flipped sequence, flipped back
        xr = raw[:, :, d].transpose(1, 2)
        xr = xr.flip(-1) if d else xr
        o = F.silu(F.conv1d(xr, w[d][:, None], b[d], padding=k - 1, groups=c)[..., :l])
        ref.append((o.flip(-1) if d else o).transpose(1, 2))
    ref = torch.stack(ref)
    plain = torch.autograd.grad((ref * go).sum(), [raw, w, b])
    assert rel(out, ref) < 1e-5
    assert max(rel(a, r) for a, r in zip(fast, plain)) < 1e-5


@pytest.mark.parametrize("shape", [(3, 7, 24), (5, 96), (1, 1, 256)])  # rows not a multiple of 8; n not a power of 2
def test_rms_scale_matches_reference(shape):
    from bsmamba2.kernels.norm import rms_scale, rms_scale_reference

    x = (3 * torch.randn(shape, device=DEV)).requires_grad_()
    out = rms_scale(x, 1e-5)
    go = torch.randn_like(out)
    (gx,) = torch.autograd.grad((out * go).sum(), [x])
    xr = x.detach().double().requires_grad_()
    ref = rms_scale_reference(xr, 1e-5)
    (gr,) = torch.autograd.grad((ref * go.double()).sum(), [xr])
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel(out, ref) < 1e-5 and rel(gx, gr) < 1e-5


@pytest.mark.parametrize("shape", [(3, 7, 24), (2, 5, 256)])
def test_final_norm_kernel_matches_plain_norm(shape, monkeypatch):
    """The band-split models' final norm as one kernel (no autograd, Triton backend) against its plain form: the
    same values in float32; under autocast written in the autocast dtype; a zero row stays zero."""
    from bsmamba2.kernels.norm import l2_scale
    from bsmamba2.spectral import ScaledL2Norm

    norm = ScaledL2Norm(shape[-1]).to(DEV)
    with torch.no_grad():
        norm.gamma.add_(0.5 * torch.randn_like(norm.gamma))
    x = 3 * torch.randn(shape, device=DEV)
    x[0, 0] = 0
    ref = norm(x).detach()  # autograd on: the plain form
    out = l2_scale(x, norm.gamma, norm.scale, 1e-12, torch.float32)
    assert out.shape == x.shape and rel(out, ref) < 1e-6 and not out[0, 0].any()
    if DEV == "cpu":  # the kernel through the interpreter
        monkeypatch.setattr(switches, "resolve_backend", lambda device: "triton")
    with torch.no_grad():
        assert rel(norm(x), ref) < 1e-6
        with torch.autocast(DEV, dtype=torch.bfloat16):
            y = norm(x)
    assert y.dtype == torch.bfloat16 and rel(y.float(), ref) < 1e-2


def test_band_split_kernel_path_matches_loop(monkeypatch):
    """Without autograd on the Triton backend the grouped band split normalizes each group in one kernel that also
    writes a column of ones, and the product takes the bias as a weight column: against the per-band loop, float32
    and under bf16 autocast; and the kernel's per-band form alone, zero padding included."""
    from bsmamba2.config import PAPER_BAND_WIDTHS
    from bsmamba2.kernels.norm import l2_scale
    from bsmamba2.spectral import BandSplit, band_feature_sizes

    torch.manual_seed(0)
    split = BandSplit(16, band_feature_sizes(PAPER_BAND_WIDTHS, 2)).to(DEV)
    with torch.no_grad():
        for p in split.parameters():
            p.add_(0.5 * torch.randn_like(p))
    x = torch.randn(2, 5, sum(split.feature_sizes), device=DEV)
    if DEV == "cpu":  # the kernel through the interpreter
        monkeypatch.setattr(switches, "resolve_backend", lambda device: "triton")
    with torch.no_grad():
        ref = split.forward_reference(x)
        assert rel(split.forward_grouped(x), ref) < 1e-5
        with torch.autocast(DEV, dtype=torch.bfloat16):
            y16 = split.forward_grouped(x)
    assert y16.dtype == torch.bfloat16 and rel(y16.float(), ref) < 1e-2
    xg = torch.randn(6, 40, device=DEV)[:, 4:34].view(6, 3, 10)  # (m, g, n) strided, as a group's slice
    gamma = torch.randn(3, 10, device=DEV)
    out = l2_scale(xg, gamma, 2.0, 1e-12, torch.float32, ones=True)
    expect = torch.nn.functional.normalize(xg, dim=-1) * 2.0 * gamma
    assert out.shape == (6, 3, 16) and rel(out[..., :10], expect) < 1e-6
    assert torch.equal(out[..., 10], torch.ones(6, 3, device=DEV)) and not out[..., 11:].any()


@pytest.mark.parametrize("length", [13, 45])  # one chunk; several chunks
def test_mixer_core_node_matches_chained_functions(length):
    """The block's one node conv → scan → gated norm → + gn W_gᵀ (gradients written into shared buffers, the conv
    output and gn recomputed in backward) vs the chain of the separate autograd functions on split views and a plain
    product: output and every input gradient (in-projection, conv weights, dt_bias, A, D, norm gains, W_g and the
    accumulated term), float32."""
    from bsmamba2.kernels.block import MixerCore, mixer_core_reference

    torch.manual_seed(length)
    s, d, e, h, p, g, n, k = 3, 8, 16, 4, 4, 2, 6, 4
    c = e + 2 * g * n
    zx = torch.randn(s, length, 2, 2 * (e + c + h) + 5, device=DEV)[..., 3:3 + e + c + h]  # strided, as a view
    inputs = [torch.randn(s * length, d, device=DEV), zx, 0.5 * torch.randn(2, c, k, device=DEV),
              0.1 * torch.randn(2, c, device=DEV),
              torch.randn(2, h, device=DEV) - 1, -torch.rand(2, h, device=DEV) - 0.2, torch.randn(2, h, device=DEV),
              1 + 0.1 * torch.randn(2, e, device=DEV), torch.randn(d, 2 * e, device=DEV) / e]
    args = ((e, c, h, p, g, n), 1e-5, e // 2)
    outs, grads = [], []
    for fn in (MixerCore.apply, mixer_core_reference):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        acc = leaves[0].clone().view(s, length, d)  # the node adds into acc in place: a view, as in the block
        out = fn(acc, *leaves[1:], *args)
        go = torch.randn(out.shape, device=DEV, generator=torch.Generator(device=DEV).manual_seed(1))
        outs.append(out)
        grads.append(torch.autograd.grad((out * go).sum(), leaves))
    assert outs[0].shape == (s, length, d)
    assert rel(outs[0], outs[1]) < 1e-6
    names = ["acc", "zxbcdt", "conv_w", "conv_b", "dt_bias", "A", "D", "norm_w", "w_g"]
    errors = {nm: rel(a, b) for nm, a, b in zip(names, *grads)}
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_norm_backward_also_writes_the_forward_output(dtype):
    """The gated norm's backward kernel, asked for it, writes the forward's output too: equal to `gated_norm_fwd`'s
    bit for bit (MixerCore's W_g gradient takes it in place of the forward's gn); its gradients are those of the
    plain gated norm (per direction and group: g = y·silu(z), g·rsqrt(mean(g²) + eps)·w) by autograd."""
    from bsmamba2.kernels.norm import gated_norm_bwd, gated_norm_fwd

    torch.manual_seed(3)
    s, l, e, gs, eps = 2, 7, 12, 4, 1e-5
    y = torch.randn(2, s, l, e, device=DEV).to(dtype)
    z = torch.randn(s, l, 2, e + 3, device=DEV).to(dtype)[..., 1:1 + e]  # a strided view, as of the in-projection
    w = (1 + 0.1 * torch.randn(2, e, device=DEV)).to(dtype)
    dout = torch.randn(s, l, 2 * e, device=DEV).to(dtype)
    out = torch.empty(s, l, 2 * e, device=DEV, dtype=dtype)
    dy, dz, dw = gated_norm_bwd(dout, y, z, w, eps, gs, out=out)
    assert torch.equal(out, gated_norm_fwd(y, z, w, eps, gs))
    plain_dy, plain_dz, plain_dw = gated_norm_bwd(dout, y, z, w, eps, gs)  # without the extra output
    assert torch.equal(dy, plain_dy) and torch.equal(dz, plain_dz) and torch.equal(dw, plain_dw)

    y64, z64, w64 = (t.detach().double().requires_grad_() for t in (y, z, w))
    g = y64.permute(1, 2, 0, 3) * F.silu(z64)  # (s, l, 2, e)
    grouped = g.unflatten(-1, (e // gs, gs))
    ref = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * w64
    ref = ref.flatten(-2)  # (s, l, 2e): both directions side by side
    ref_dy, ref_dz, ref_dw = torch.autograd.grad(ref, (y64, z64, w64), dout.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel(out.double(), ref) < tol
    assert rel(dy.double(), ref_dy) < tol and rel(dz.double(), ref_dz) < tol and rel(dw.double(), ref_dw) < tol


@pytest.mark.parametrize("autocast", [False, True])
def test_prenorm_in_node_matches_chain(autocast):
    """The block's pre-norm + in-projection node (xn recomputed in backward) vs rms_scale then F.linear: output and
    gradients of x and w_in, float32 and under bfloat16 autocast (w_in in the products' dtype, as the block has it)."""
    from bsmamba2.kernels.block import PreNormIn, prenorm_in_reference

    torch.manual_seed(2)
    x0, w0 = torch.randn(3, 11, 16, device=DEV), torch.randn(40, 16, device=DEV) / 4
    go = torch.randn(3, 11, 40, device=DEV)
    results = []
    for fn in (PreNormIn.apply, prenorm_in_reference):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=autocast):
            out = fn(x, w.to(torch.bfloat16) if autocast else w, 1e-5)
        results.append((out, *torch.autograd.grad((out.float() * go).sum(), [x, w])))
    assert results[0][0].dtype == results[1][0].dtype == (torch.bfloat16 if autocast else torch.float32)
    errors = {nm: rel(a, b) for nm, a, b in zip(["out", "dx", "dw_in"], *results)}
    assert max(errors.values()) < 1e-6, errors


def test_block_forward_saves_neither_conv_output_nor_gated_norm_output():
    """What the autograd block keeps for backward (every tensor saved, one count per storage): neither the conv
    output xbc (2, s, l, c) nor the gated-norm output gn (s, l, 2e) nor the normalized input xn (s, l, d), which the
    backward recomputes; the total is at most what the chain of separate functions keeps (counted from the shapes)
    less those three and the pre-norm's row scales."""
    from bsmamba2.fused_block import _dims, merged_weights
    from bsmamba2.kernels.block import block_forward

    cfg = Mamba2Config(expand=2, d_state=16, headdim=8, chunk_size=16)
    blk = _block(16, cfg, seed=6)
    s, l, d = 3, 19, 16
    e, c, h, p, g, n = dims = _dims(blk)
    f = blk.forward_blocks[0]
    merged = [w.detach().requires_grad_() for w in merged_weights(blk)]
    x = torch.randn(s, l, d, device=DEV, requires_grad=True)
    saved: dict[int, int] = {}  # storage address → bytes
    shapes = []

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = block_forward(x, tuple(merged), blk.linear.bias, dims, f.norm.eps, f.mixer.norm.eps,
                          f.mixer.norm.group_size)
    torch.autograd.grad(y.sum(), [x, *merged])  # the saved set suffices for backward
    xbc_shape, gn_shape = (2, s, l, c), (s, l, 2 * e)
    assert not {xbc_shape, gn_shape, (s * l, 2 * e)} & set(shapes), shapes  # gn also as the product's 2-D view
    f32 = 4  # bytes: everything is float32 here
    weights = sum(w.numel() for w in merged) * f32
    acts = {"x": s * l * d, "rstd": s * l, "xn": s * l * d, "zxbcdt": s * l * 2 * (e + c + h),
            "xbc": 2 * s * l * c, "dt": 2 * s * l * h, "y": 2 * s * l * h * p, "gn": s * l * 2 * e}
    chained = weights + f32 * sum(acts.values())
    recomputed = f32 * (acts["xbc"] + acts["gn"] + acts["xn"] + acts["rstd"])
    assert sum(saved.values()) <= chained - recomputed, (sum(saved.values()), chained)


def test_block_forward_keeps_the_conv_output_on_request():
    """keep_conv_output: the block saves the conv output xbc (2, s, l, c) for backward instead of recomputing it;
    the output and every gradient stay bit for bit the same."""
    from bsmamba2.fused_block import _dims, merged_weights
    from bsmamba2.kernels.block import block_forward

    cfg = Mamba2Config(expand=2, d_state=16, headdim=8, chunk_size=16)
    blk = _block(16, cfg, seed=7)
    s, l, d = 2, 21, 16
    e, c, h, p, g, n = dims = _dims(blk)
    f = blk.forward_blocks[0]
    x0 = torch.randn(s, l, d, device=DEV)
    results = []
    for keep in (False, True):
        x = x0.clone().requires_grad_()
        merged = [w.detach().requires_grad_() for w in merged_weights(blk)]
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            y = block_forward(x, tuple(merged), blk.linear.bias, dims, f.norm.eps, f.mixer.norm.eps,
                              f.mixer.norm.group_size, keep_conv_output=keep)
        assert ((2, s, l, c) in shapes) == keep, shapes
        gy = torch.randn(y.shape, device=DEV, generator=torch.Generator(device=DEV).manual_seed(2))
        results.append((y, *torch.autograd.grad((y * gy).sum(), [x, *merged])))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_auto_keeps_conv_outputs_on_the_fast_path(monkeypatch):
    """On the fast path the footprint's dry runs measure what a kept conv output adds (the conv output's bytes per
    time-axis / band-axis module), and the cost model predicts the bytes saved for backward by a plan that keeps
    them."""
    from conftest import SavedBytes

    from bsmamba2.build import build_model
    from bsmamba2.config import STFTConfig
    from bsmamba2.losses import SeparationLoss
    from bsmamba2.memory import CheckpointPlan, measure_footprint

    if DEV == "cpu":  # the kernels through the interpreter
        monkeypatch.setattr(switches, "resolve_backend", lambda device: "triton")
    torch.manual_seed(8)
    # few frames and bands: the interpreter runs every program of every launch one after another
    config = BSMamba2Config.tiny(depth=1, dim=8, stft=STFTConfig(n_fft=32, hop_length=16), band_widths=(4, 4, 4, 5))
    model = build_model(config).to(DEV)
    loss_fn = SeparationLoss(10.0, (64,), 32, 64).to(DEV)  # one resolution: fast
    batch, samples = 1, 160
    fp = measure_footprint(model, loss_fn, batch, samples, contextlib.nullcontext, SavedBytes())
    mixer = model.layers[0][0].forward_blocks[0].mixer
    frames, bands = samples // model.config.stft.hop_length + 1, len(model.config.band_widths)
    xbc_bytes = 2 * batch * frames * bands * mixer.conv_dim * 4  # (2, s, l, c) float32, s·l tokens on either axis
    assert fp.conv_output == (xbc_bytes, xbc_bytes)
    assert model.kept_conv_outputs == frozenset()  # restored
    plan = CheckpointPlan(1, 0, 0, keep=2)  # both modules keep theirs (the values: the test above)
    model.kept_conv_outputs = plan.kept()
    wave = 0.1 * torch.randn(batch, 2, samples, device=DEV)
    tgt = 0.05 * torch.randn(batch, 1, 2, samples, device=DEV)

    def step():
        loss_fn(model.forward_waveform(wave), tgt)[0].backward()

    assert SavedBytes()(step) + fp.fixed == pytest.approx(fp.peak(plan), rel=1e-9)


def test_block_q_for_lengths():
    block = int(os.environ.get("BSMAMBA2_SSD_BLOCK", "64"))
    assert block_q_for(1) == 16
    assert block_q_for(801) == block
    assert block_q_for(block) == block  # one chunk
    if block == 64:
        assert block_q_for(62) == 64  # the band axis is one chunk


def _block(dim, mamba_cfg, seed):
    torch.manual_seed(seed)
    blk = BiMamba2Block(dim, mamba_cfg)
    with torch.no_grad():  # move every parameter off its initial value so that each one matters
        for prm in blk.parameters():
            prm.add_(0.1 * torch.randn_like(prm))
    return blk.to(DEV)


def test_fast_block_matches_plain_block_float32():
    cfg = Mamba2Config(expand=2, d_state=16, headdim=8, chunk_size=16)
    blk = _block(16, cfg, seed=1)
    x = torch.randn(2, 23, 16, device=DEV, requires_grad=True)
    params = [x] + list(blk.parameters())
    y = bimamba2_block_forward(blk, x)
    gy = torch.randn_like(y)
    fast = torch.autograd.grad((y * gy).sum(), params)
    switches.set_backend("torch")
    try:
        yr = blk(x)
    finally:
        switches.set_backend("auto")
    plain = torch.autograd.grad((yr * gy).sum(), params)
    assert rel(y, yr) < 1e-5
    names = ["x"] + [nm for nm, _ in blk.named_parameters()]
    errors = {nm: rel(a, b) for nm, a, b in zip(names, fast, plain)}
    assert max(errors.values()) < 1e-4, errors


def test_fast_block_writes_into_transposed_out():
    """Without autograd the fast block's residual add writes into a strided 4-D `out` (the model's next layout)."""
    cfg = Mamba2Config(expand=2, d_state=16, headdim=8, chunk_size=16)
    blk = _block(16, cfg, seed=4)
    x = torch.randn(6, 21, 16, device=DEV)  # 6 sequences = (2 batches, 3 bands)
    buf = torch.empty(2, 21, 3, 16, device=DEV)  # (b, t, k, d): the band pass's layout
    with torch.no_grad():
        y = bimamba2_block_forward(blk, x)
        written = bimamba2_block_forward(blk, x, out=buf.transpose(1, 2))  # (b, k, t, d) view
        switches.set_backend("torch")
        try:
            yr = blk(x)
        finally:
            switches.set_backend("auto")
    assert written.data_ptr() == buf.data_ptr()
    assert torch.equal(buf.transpose(1, 2).reshape(6, 21, 16), y)
    assert rel(y - x, yr - x) < 1e-5


def _fused_scan_reference(zx, cw, cb, dt_bias, A, D, dims):
    """The fused scan options in plain PyTorch: conv1d + SiLU (both directions), softplus, the float64 scan, gate."""
    from bsmamba2.kernels.conv import conv_silu_bidirectional
    from bsmamba2.kernels.dt import softplus_dt_reference

    e, h, p, g, n = dims
    two, s, l, w = zx.shape
    raw = zx.permute(1, 2, 0, 3)  # (s, l, 2, w): the layout the chained functions read
    xbc = conv_silu_bidirectional(raw[..., e:2 * e + 2 * g * n], cw, cb).reshape(2 * s, l, -1)
    dt = softplus_dt_reference(raw[..., 2 * e + 2 * g * n:], dt_bias).reshape(2 * s, l, h)
    xs, B, C = xbc.split([e, g * n, g * n], dim=-1)
    y = reference_scan(xs.unflatten(-1, (h, p)).double(), dt.double(), A.double(), B.unflatten(-1, (g, n)).double(),
                       C.unflatten(-1, (g, n)).double(), D.double(), 2)
    z = zx.reshape(2 * s, l, w)[..., :e].unflatten(-1, (h, p)).double()
    gated = y * F.silu(z)
    return gated, gated.pow(2).sum(-1)


@pytest.mark.parametrize("taps_major", [False, True])  # the conv weight channel-major, or as the fused block keeps it
@pytest.mark.parametrize("length", [1, 13, 16])  # one chunk: shorter than the conv, partial, full
def test_fused_scan_options_match_chained_reference(length, taps_major):
    """ssd_fwd reading the in-projection in place (conv1d + SiLU of x and of B, C, softplus of dt, gate by silu(z),
    Σg² per head) against the separate plain steps, float32: two groups, headdim and d_state narrower than the
    kernels' tiles, the conv weight in either memory order. Longer sequences refuse the options."""
    from bsmamba2.kernels.conv import conv_taps_major
    from bsmamba2.kernels.ssd import ssd_fwd

    torch.manual_seed(length)
    s, h, p, g, n, k = 3, 4, 6, 2, 5, 4
    e = h * p
    w = 2 * e + 2 * g * n + h  # one direction's in-projection [z, x, B, C, dt]
    zx = torch.randn(2, s, length, w, device=DEV)
    cw, cb = 0.5 * torch.randn(2, e + 2 * g * n, k, device=DEV), 0.1 * torch.randn(2, e + 2 * g * n, device=DEV)
    dt_bias, A, D = torch.randn(2, h, device=DEV) - 1, -torch.rand(2, h, device=DEV) - 0.2, torch.randn(2, h,
                                                                                                         device=DEV)
    cols = zx.view(2 * s, length, w)
    z, xs, bc, dt = cols.split([e, e, 2 * g * n, h], dim=-1)
    B, C = (t.unflatten(-1, (g, n)) for t in bc.split([g * n, g * n], dim=-1))
    cw_in = conv_taps_major(cw) if taps_major else cw
    assert torch.equal(cw_in, cw) and (cw_in.stride(1) == 1) == taps_major
    gated, ss = ssd_fwd(xs.unflatten(-1, (h, p)), dt, A, B, C, D, dir_mode=2, x_conv=(cw_in, cb),
                        bc_conv=(cw_in, cb), dt_bias=dt_bias, z=z.unflatten(-1, (h, p)))
    ref, ref_ss = _fused_scan_reference(zx, cw, cb, dt_bias, A, D, (e, h, p, g, n))
    assert gated.shape == (2 * s, length, h, p) and ss.shape == (2 * s, length, h) and ss.dtype == torch.float32
    assert rel(gated, ref) < 1e-5 and rel(ss, ref_ss) < 1e-5
    long = torch.zeros(2 * s, block_q_for(1000) + 1, h, p, device=DEV)
    with pytest.raises(ValueError, match="band-axis sequences"):
        ssd_fwd(long, long[..., 0], A, long[..., :g, :1], long[..., :g, :1], D, dir_mode=2, dt_bias=dt_bias)


@pytest.mark.parametrize("length", [13, 45])
def test_fused_inference_block_matches_plain_block(length, monkeypatch):
    """Without autograd the block takes the fused path (the gated norm's scale applied after the out-projection):
    against the plain block and against the autograd fast path, float32, into a new tensor and into a strided out."""
    from bsmamba2.kernels import block as fast

    orig, calls = fast.block_inference, []
    monkeypatch.setattr(fast, "block_inference", lambda *a: calls.append(1) or orig(*a))
    cfg = Mamba2Config(expand=2, d_state=16, headdim=8, chunk_size=16)
    blk = _block(16, cfg, seed=7)
    x = torch.randn(6, length, 16, device=DEV)
    buf = torch.empty(2, length, 3, 16, device=DEV)
    with torch.no_grad():
        y = bimamba2_block_forward(blk, x)
        bimamba2_block_forward(blk, x, out=buf.transpose(1, 2))
        switches.set_backend("torch")
        try:
            yr = blk(x)
        finally:
            switches.set_backend("auto")
    ya = bimamba2_block_forward(blk, x)  # autograd enabled: the unfused fast path
    assert len(calls) == 2
    assert rel(y - x, yr - x) < 1e-5 and rel(y - x, ya.detach() - x) < 1e-5
    assert torch.equal(buf.transpose(1, 2).reshape(y.shape), y)


@pytest.mark.parametrize("e, n, block_n", [(64, 24, "256"), (40, 48, "16")])  # one column block; several, odd e
def test_gated_proj_matches_reference(e, n, block_n, monkeypatch):
    """Gate, Σg² and out-projection in one product against the plain twin, on strided y and z (z a view of an
    in-projection-like buffer)."""
    from bsmamba2.kernels.gated_proj import gated_proj, gated_proj_reference

    monkeypatch.setenv("BSMAMBA2_GP_BLOCK_N", block_n)
    r = 37
    y = torch.randn(2, r, e, device=DEV)
    z = torch.randn(r, 2, e + 9, device=DEV).permute(1, 0, 2)[..., 4:4 + e]
    w = torch.randn(2, e, n, device=DEV)
    p, ss = gated_proj(y, z, w)
    pr, ssr = gated_proj_reference(y, z, w)
    assert p.shape == (2, r, n) and ss.shape == (2, r) and ss.dtype == torch.float32
    assert rel(p, pr) < 1e-5 and rel(ss, ssr) < 1e-5


def test_gated_merge_matches_reference():
    """The residual add with the gated norm's row scale, written into a strided out, and the next pre-norm written
    beside it, against the plain twin."""
    from bsmamba2.kernels.residual import gated_merge_into, gated_merge_reference

    s, l, n, h, e = 6, 5, 24, 3, 40
    parts = torch.randn(2, s * l, n, device=DEV, dtype=torch.bfloat16)
    ss = torch.rand(2, s * l, h, device=DEV) * 50
    merged, x = torch.randn(s, l, n, device=DEV), torch.randn(s, l, n, device=DEV)
    expect, expect_xn = gated_merge_reference(parts, ss, merged, x, e, 1e-5, scaled_eps=1e-3)
    assert torch.allclose(gated_merge_into(parts, ss, merged, x, e, 1e-5), expect, atol=1e-5)
    buf, xn_buf = torch.empty(l, 2, 3, n, device=DEV), torch.empty(l, 2, 3, n, device=DEV)
    out, xn = buf.movedim(0, -2), xn_buf.movedim(0, -2)  # (2, 3, l, n) strided views
    assert gated_merge_into(parts, ss, merged, x, e, 1e-5, out=out, scaled=(xn, 1e-3)).data_ptr() == buf.data_ptr()
    assert torch.allclose(out.reshape(s, l, n), expect, atol=1e-5)
    assert torch.allclose(xn.reshape(s, l, n), expect_xn, atol=1e-5)
    with pytest.raises(ValueError, match="disagree"):
        gated_merge_into(parts[:, 1:], ss, merged, x, e, 1e-5)
    with pytest.raises(ValueError, match="strided like out"):
        gated_merge_into(parts, ss, merged, x, e, 1e-5, out=out, scaled=(xn.contiguous(), 1e-3))


def test_fused_blocks_chain_the_prenorm(monkeypatch):
    """In a model's inference loop each fused block's merge writes the next block's pre-norm, which that block reads
    instead of normalizing (one norm pass for the whole stack): same output as without the chaining, and as the
    plain path."""
    from bsmamba2.kernels import block as fast
    from bsmamba2.build import build_model

    torch.manual_seed(0)
    cfg = BSMamba2Config.tiny(depth=2, band_widths=(8,) * 4 + (993,))  # few bands: quick in the interpreter
    model = build_model(cfg).to(DEV).eval()
    spec = torch.randn(1, 2, cfg.stft.n_fft // 2 + 1, 20, dtype=torch.complex64, device=DEV)  # two time chunks
    with torch.no_grad():
        plain = model(spec)  # plain PyTorch without CUDA
        if DEV == "cpu":  # the kernels through the interpreter
            monkeypatch.setattr(switches, "resolve_backend", lambda device: "triton")
        norms, orig = [], fast.rms_scale
        monkeypatch.setattr(fast, "rms_scale", lambda *a: norms.append(1) or orig(*a))
        chained = model(spec)
        assert len(norms) == 1  # the first block's only
        monkeypatch.setattr(BiMamba2Block, "fuses_prenorm", lambda self, x: False)
        unchained = model(spec)
        assert len(norms) == 1 + 2 * cfg.depth
    chained, unchained, plain = (torch.view_as_real(t) for t in (chained, unchained, plain))
    assert rel(chained, unchained) < 1e-5 and rel(chained, plain) < 1e-4


def test_available_reports_interpreter_or_cuda():
    assert kernels.available() == (torch.cuda.is_available() or kernels.interpreting())


# ----------------------------------------------------------------------------------------------------------- GPU


def _block_grads(blk, x, gy, backend, bf16):
    switches.set_backend(backend)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            y = blk(x)
        grads = torch.autograd.grad((y.float() * gy).sum(), [x] + list(blk.parameters()))
    finally:
        switches.set_backend("auto")
    return [y] + list(grads)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fast_block_paper_size(dtype):
    """A paper-size block (dim 256, 16 heads of 64, d_state 128) at both axes' lengths: output and every gradient of
    the fast path against the plain path in float32. float32: ≤1e-3. bf16 autocast: ≤2e-2, or (for a gradient that
    bf16 itself moves further, such as the sums behind dA_log) no worse than 1.5× the plain path under bf16."""
    blk = _block(256, Mamba2Config(), seed=2)
    names = ["y", "x"] + [nm for nm, _ in blk.named_parameters()]
    for s, l in ((40, 62), (4, 801)):
        x = torch.randn(s, l, 256, device=DEV, requires_grad=True)
        gy = torch.randn(s, l, 256, device=DEV)
        ref = _block_grads(blk, x, gy, "torch", bf16=False)
        fast = _block_grads(blk, x, gy, "triton", bf16=dtype == torch.bfloat16)
        errors = {nm: rel(a, b) for nm, a, b in zip(names, fast, ref)}
        if dtype == torch.float32:
            assert max(errors.values()) <= 1e-3, (s, l, errors)
        else:
            plain16 = _block_grads(blk, x, gy, "torch", bf16=True)
            base = {nm: rel(a, b) for nm, a, b in zip(names, plain16, ref)}
            bad = {nm: (errors[nm], base[nm]) for nm in names if errors[nm] > max(2e-2, 1.5 * base[nm])}
            assert not bad, (s, l, bad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_fused_inference_block_paper_size(dtype):
    """The fused inference block (no autograd) at paper size on both axes' lengths against the plain block in
    float32: ≤1e-3 in float32, ≤2e-2 under bf16 or float16 autocast (float16 takes its own branches in the
    band-axis scan, `ssd_band._intra_chunk`)."""
    blk = _block(256, Mamba2Config(), seed=3)
    for s, l in ((40, 62), (4, 801)):
        x = torch.randn(s, l, 256, device=DEV)
        with torch.no_grad():
            switches.set_backend("torch")
            try:
                ref = blk(x)
            finally:
                switches.set_backend("auto")
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                y = bimamba2_block_forward(blk, x)
        assert rel(y - x, ref - x) <= (1e-3 if dtype == torch.float32 else 2e-2), (s, l)


@pytest.mark.gpu
def test_gpu_gated_proj_float16_large_values():
    """gated_proj squares g in bf16 for float16 inputs: |g| well above 256 (whose square overflows float16) still
    gives finite sums that match the float32 twin."""
    from bsmamba2.kernels.gated_proj import gated_proj, gated_proj_reference

    torch.manual_seed(0)
    y = (300 * torch.randn(2, 333, 128, device=DEV)).half()
    z = (3 + torch.randn(2, 333, 128, device=DEV)).half()
    w = (torch.randn(2, 128, 64, device=DEV) / 64).half()
    p, ss = gated_proj(y, z, w)
    p_ref, ss_ref = gated_proj_reference(y, z, w)
    assert torch.isfinite(ss).all() and torch.isfinite(p).all()
    assert rel(ss, ss_ref) < 1e-3 and rel(p.float(), p_ref.float()) < 1e-2


@pytest.mark.gpu
def test_gpu_official_fixture_through_fast_path(official_ckpt, official_io):
    from bsmamba2.checkpoint import load_model

    model = load_model(official_ckpt).cuda()
    switches.set_backend("triton")
    try:
        with torch.no_grad():
            spec = model(torch.from_numpy(official_io["mixture_spec"])[None].cuda())[0, 0].cpu()
    finally:
        switches.set_backend("auto")
    assert rel(spec, torch.from_numpy(official_io["vocals_spec"])) <= 1e-4


@pytest.mark.gpu
def test_gpu_auto_backend_picks_triton():
    assert switches.resolve_backend(torch.device("cuda")) == "triton"
    model = BSMamba2Config.tiny()
    assert model.mamba.chunk_size == 16


@pytest.mark.parametrize("lead", [(), (2, 3)])
def test_add_into_matches_strided_torch_add(lead):
    """The residual add that writes whole rows into another layout, against torch.add(out=) on the same view."""
    from bsmamba2.kernels.residual import add_into

    s, l, n = 6, 5, 24
    a = torch.randn(s, l, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(s, l, n, device=DEV)
    shape = (*lead, l, n) if lead else (s, l, n)
    buf = torch.empty(l, *lead, n, device=DEV) if lead else torch.empty(l, s, n, device=DEV)
    out = buf.movedim(0, -2)  # a strided view shaped `shape`
    assert out.shape == shape and not out.is_contiguous()
    assert add_into(a, b, out).data_ptr() == buf.data_ptr()
    expect = torch.empty_like(out)
    torch.add(a.reshape(shape), b.reshape(shape), out=expect)
    assert torch.allclose(out, expect, atol=1e-6)
    with pytest.raises(ValueError, match="disagree"):
        add_into(a, b[:-1], out)


def test_softplus_dt_matches_reference():
    """One-pass softplus of dt against F.softplus on the in-projection's strided view, including the far tails
    (tiny and above F.softplus's threshold)."""
    from bsmamba2.kernels.dt import softplus_dt, softplus_dt_reference

    s, l, h = 3, 7, 5
    buf = torch.randn(s, l, 2, h + 4, device=DEV) * 4
    buf[0, 0, 0, :3] = torch.tensor([-30.0, 25.0, 0.0])
    raw = buf[..., 2:2 + h]  # (s, l, 2, h) view, row stride h + 4
    bias = torch.randn(2, h, device=DEV)
    out = softplus_dt(raw, bias)
    ref = softplus_dt_reference(raw, bias)
    assert out.shape == (2, s, l, h) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
