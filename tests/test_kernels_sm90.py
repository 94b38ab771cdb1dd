"""The Hopper time-axis scan in Gluon (`bsmamba2.kernels.ssd_time_sm90`) against the plain scan.

Triton's CPU interpreter does not run Gluon, so on the CPU the tests check the kernel's decay pre-pass against a
step-by-step loop and compile the kernel for sm_90a (registers, spills, shared memory), in a fresh process as
`tools/sm90_loop_stats.py` does; the `gpu` tests run it on a Hopper GPU against the float64 plain scan.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the decay pre-pass is a Triton kernel

pytest.importorskip("triton")

from bsmamba2.kernels import ssd_band_sm90, ssd_time_sm90  # noqa: E402
from bsmamba2.ssd import ssd_chunked  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dir_mode", [0, 1, 2])
def test_chunk_steps_match_a_step_by_step_loop(dir_mode):
    """The PyTorch twin against the definition, step by step; the Triton pass against the twin, on a strided dt
    (the model's (2, s, l, h) softplus output read as (2s, l, h) is contiguous; a view of a wider one is not)."""
    gen = torch.Generator().manual_seed(0)
    s, l, h, q = 4, 37, 3, 16
    dt = F.softplus(torch.randn(s, l, h, generator=gen))
    ndir = 2 if dir_mode == 2 else 1
    A = -torch.rand(ndir, h, generator=gen) - 0.1
    st = ssd_time_sm90.chunk_steps_reference(dt, A, dir_mode, block_q=q)
    nc = math.ceil(l / q)
    assert st.shape == (s, h, nc, 2, q) and st.is_contiguous()
    wide = torch.zeros(s, l, h + 2)
    wide[..., 1:h + 1] = dt
    fast = ssd_time_sm90.chunk_steps(wide[..., 1:h + 1].to(DEV), A.to(DEV), dir_mode, block_q=q).cpu()
    assert fast.shape == st.shape
    torch.testing.assert_close(fast, st, rtol=1e-5, atol=1e-5)
    for i in range(s):
        reverse = dir_mode == 1 or (dir_mode == 2 and i >= s // 2)
        d = 1 if dir_mode == 2 and i >= s // 2 else 0
        for k in range(h):
            for tau in range(nc * q):
                c, r = divmod(tau, q)
                step = 0.0 if tau >= l else dt[i, l - 1 - tau if reverse else tau, k].item()
                assert st[i, k, c, 0, r].item() == pytest.approx(step, abs=1e-7)
                cum = sum(0.0 if t >= l else dt[i, l - 1 - t if reverse else t, k].item()
                          for t in range(c * q, tau + 1)) * A[d, k].item() * ssd_time_sm90.LOG2E.value
                assert st[i, k, c, 1, r].item() == pytest.approx(cum, rel=1e-5, abs=1e-5)


def test_applies_only_on_hopper_cuda_inputs():
    x = torch.zeros(2, 10, 4, 64, dtype=torch.bfloat16)
    B = torch.zeros(2, 10, 1, 128, dtype=torch.bfloat16)
    assert not ssd_time_sm90.applies(x, B, B)  # CPU tensors


def _compile_stats(kernel: str) -> dict:
    """`tools/sm90_loop_stats.py --kernel KERNEL --json` in a fresh process (other test modules turn on the
    interpreter, under which Triton builds no GPU code): the sm_90a compile's registers, shared memory and loop."""
    if not ssd_time_sm90.gluon_importable():
        pytest.skip("this Triton has no Gluon")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "sm90_loop_stats.py"), "--kernel", kernel,
                          "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kernel_compiles_for_sm90():
    """The kernel compiled for sm_90a as `ssd_fwd` launches it at the paper's time axis: within two programs per
    SM (≤ 255 registers, ≤ 113 KB of shared memory)."""
    pytest.importorskip("triton")
    stats = _compile_stats("gluon")
    assert stats["kernel"] == "gluon" and stats["registers"] <= 255
    assert stats["shared_bytes"] <= 113 * 1024, stats
    assert stats["tensor_core"] > 0 and stats["async_copies"] > 0, stats


def _reference(x, dt, A, B, C, D, dir_mode):
    """The plain chunked scan in float64: sequences scanned from their end flipped, scanned, flipped back."""
    s = x.shape[0]
    halves = [(0, s // 2, False, 0), (s // 2, s, True, 1)] if dir_mode == 2 else [(0, s, dir_mode == 1, 0)]
    outs = []
    for lo, hi, rev, k in halves:
        f = (lambda t: t.flip(1)) if rev else (lambda t: t)
        y = ssd_chunked(*(f(t[lo:hi]).double() for t in (x, dt)), A[k].double(), f(B[lo:hi]).double(),
                        f(C[lo:hi]).double(), None if D is None else D[k].double(), chunk_size=64)
        outs.append(f(y))
    return torch.cat(outs)


@pytest.mark.gpu
@pytest.mark.parametrize("dir_mode", [0, 1, 2])
@pytest.mark.parametrize("length", [801, 65, 128, 200])  # the time axis; one row past a chunk; whole chunks
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("has_d", [True, False])
def test_gpu_sm90_scan_matches_float64(dir_mode, length, dtype, has_d):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs a Hopper GPU")
    if not ssd_time_sm90.gluon_importable():
        pytest.skip("this Triton has no Gluon")
    gen = torch.Generator().manual_seed(length + dir_mode)
    s, h, p, n = 4, 4, 64, 128
    e, c = h * p, h * p + 2 * n
    xbc = F.silu(torch.randn(s, length, c, generator=gen)).cuda().to(dtype)  # x, B, C views of one tensor
    x, B, C = xbc.split([e, n, n], dim=-1)
    x, B, C = x.unflatten(-1, (h, p)), B.unflatten(-1, (1, n)), C.unflatten(-1, (1, n))
    dt = F.softplus(torch.randn(s, length, h, generator=gen) - 1.0).cuda()
    ndir = 2 if dir_mode == 2 else 1
    A = -torch.exp(torch.rand(ndir, h, generator=gen) * 2.0).cuda()
    D = torch.randn(ndir, h, generator=gen).cuda() if has_d else None
    assert ssd_time_sm90.applies(x, B, C)
    y = ssd_time_sm90.time_fwd_sm90(x, dt, A, B, C, D, dir_mode)
    ref = _reference(x, dt, A, B, C, D, dir_mode)
    assert torch.isfinite(y).all()
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err


@pytest.mark.gpu
def test_gpu_ssd_fwd_takes_the_sm90_kernel_when_asked(monkeypatch):
    """`ssd_fwd` with BSMAMBA2_SSD_GLUON=1 gives the Gluon kernel's output, and the Triton kernel's within bf16."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs a Hopper GPU")
    from bsmamba2.kernels.ssd import ssd_fwd

    gen = torch.Generator().manual_seed(1)
    s, l, h, p, n = 4, 801, 4, 64, 128
    x = torch.randn(s, l, h, p, generator=gen).cuda().bfloat16()
    B = torch.randn(s, l, 1, n, generator=gen).cuda().bfloat16()
    C = torch.randn(s, l, 1, n, generator=gen).cuda().bfloat16()
    dt = F.softplus(torch.randn(s, l, h, generator=gen) - 1.0).cuda()
    A, D = -torch.rand(2, h, generator=gen).cuda() - 0.1, torch.randn(2, h, generator=gen).cuda()
    monkeypatch.setenv("BSMAMBA2_SSD_GLUON", "0")
    triton_y = ssd_fwd(x, dt, A, B, C, D, dir_mode=2)
    monkeypatch.setenv("BSMAMBA2_SSD_GLUON", "1")
    gluon_y = ssd_fwd(x, dt, A, B, C, D, dir_mode=2)
    direct = ssd_time_sm90.time_fwd_sm90(x, dt, A, B, C, D, 2)
    assert torch.equal(gluon_y, direct)
    assert ((gluon_y.float() - triton_y.float()).norm() / triton_y.float().norm()).item() < 2e-2


def test_chunk_steps_softplus_matches_twin():
    """The pre-pass on raw dt with a bias (the band kernel's steps, softplus(dt + bias)) against its PyTorch twin,
    on a strided dt (a view of the in-projection) and both directions in one call."""
    gen = torch.Generator().manual_seed(5)
    s, l, h = 6, 62, 16
    raw = torch.randn(s, l, h + 3, generator=gen)[..., 2:h + 2] * 2.0
    A = -torch.rand(2, h, generator=gen) - 0.1
    dt_bias = torch.randn(2, h, generator=gen) - 1.0
    st = ssd_time_sm90.chunk_steps_reference(raw, A, 2, dt_bias=dt_bias)
    fast = ssd_time_sm90.chunk_steps(raw.to(DEV), A.to(DEV), 2, dt_bias=dt_bias.to(DEV)).cpu()
    torch.testing.assert_close(fast, st, rtol=1e-5, atol=1e-5)
    d0 = F.softplus(raw[0, :, 3] + dt_bias[0, 3])  # forward half: scan order is memory order
    torch.testing.assert_close(st[0, 3, 0, 0, :l], d0)
    d1 = F.softplus(raw[s - 1, :, 3] + dt_bias[1, 3]).flip(0)  # backward half, read from the end
    torch.testing.assert_close(st[s - 1, 3, 0, 0, :l], d1)
    assert (st[:, :, 0, 0, l:] == 0).all()  # past the end: no step


def test_band_applies_only_on_hopper_cuda_inputs():
    x = torch.zeros(2, 62, 4, 64, dtype=torch.bfloat16)
    B = torch.zeros(2, 62, 1, 128, dtype=torch.bfloat16)
    assert not ssd_band_sm90.applies(x, B, B, x, 4)  # CPU tensors


def test_band_kernel_compiles_for_sm90():
    """The fused band-axis kernel compiled for sm_90a as `ssd_fwd` launches it at the paper's size (62 bands):
    within the launch's register cap (three programs per SM), shared memory for four, tensor-core products, and x
    and z by cp.async. (Triton 3.6, the GPU machines': 168 registers, no spills in the head loop.)"""
    stats = _compile_stats("band")
    assert stats["kernel"] == "band" and stats["registers"] <= ssd_band_sm90.MAXNREG, stats
    assert stats["shared_bytes"] <= 57 * 1024, stats
    assert stats["tensor_core"] > 0 and stats["async_copies"] > 0, stats


def _band_inputs(s, l, h, p, g, n, k, dtype, seed):
    """Raw band-axis inputs as views of one in-projection (2, s, l, w) [z, x, B, C, dt] per direction, and the
    fused options, as the fused block passes them."""
    from bsmamba2.kernels.conv import conv_taps_major

    gen = torch.Generator().manual_seed(seed)
    e = h * p
    w = 2 * e + 2 * g * n + h
    zx = (torch.randn(2, s, l, w, generator=gen) * 0.5).cuda().to(dtype)
    cw = conv_taps_major((0.5 * torch.randn(2, e + 2 * g * n, k, generator=gen)).cuda())
    cb = (0.1 * torch.randn(2, e + 2 * g * n, generator=gen)).cuda()
    dt_bias = (torch.randn(2, h, generator=gen) - 1.0).cuda()
    A = (-torch.exp(torch.rand(2, h, generator=gen) * 2.0)).cuda()
    D = torch.randn(2, h, generator=gen).cuda()
    z, xs, bc, dt = zx.view(2 * s, l, w).split([e, e, 2 * g * n, h], dim=-1)
    B, C = (t.unflatten(-1, (g, n)) for t in bc.split([g * n, g * n], dim=-1))
    options = dict(x_conv=(cw, cb), bc_conv=(cw, cb), dt_bias=dt_bias, z=z.unflatten(-1, (h, p)))
    return zx, (xs.unflatten(-1, (h, p)), dt, A, B, C, D), options


@pytest.mark.gpu
@pytest.mark.parametrize("length", [62, 64, 33, 5, 1])  # the paper's bands; a full tile; partial; under the conv
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("groups, d_state", [(1, 128), (2, 64)])
def test_gpu_band_kernel_matches_float64(length, dtype, groups, d_state, monkeypatch):
    """The Gluon band kernel (through `ssd_fwd`) against conv1d + SiLU, softplus, the float64 scan and the gate in
    plain PyTorch; and against the Triton pair (BSMAMBA2_SSD_GLUON_BAND=0) within 16-bit rounding."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs a Hopper GPU")
    if not ssd_time_sm90.gluon_importable():
        pytest.skip("this Triton has no Gluon")
    from test_kernels import _fused_scan_reference

    from bsmamba2.kernels import ssd as ssd_mod

    s, h, p, k = 4, 16, 64, 4  # 16 heads: the in-projection's rows 16-element aligned, as the model's
    zx, args, options = _band_inputs(s, length, h, p, groups, d_state, k, dtype, seed=length + groups)
    assert ssd_mod.band_scan_kernel(*args[:1], args[3], args[4], **options) == "gluon-sm90"
    gated, ss = ssd_mod.ssd_fwd(*args, dir_mode=2, **options)
    cw, cb = options["x_conv"]
    ref, ref_ss = _fused_scan_reference(zx.float(), cw, cb, options["dt_bias"], args[2], args[5],
                                        (h * p, h, p, groups, d_state))
    assert gated.shape == ref.shape and ss.shape == ref_ss.shape and ss.dtype == torch.float32
    assert torch.isfinite(gated).all() and torch.isfinite(ss).all()
    err = ((gated.double() - ref).norm() / ref.norm()).item()
    err_ss = ((ss.double() - ref_ss).norm() / ref_ss.norm()).item()
    assert err < 1e-2 and err_ss < 2e-2, (err, err_ss)
    monkeypatch.setenv("BSMAMBA2_SSD_GLUON_BAND", "0")
    tg, tss = ssd_mod.ssd_fwd(*args, dir_mode=2, **options)
    t_err = ((tg.double() - ref).norm() / ref.norm()).item()
    assert err < 1.5 * t_err + 1e-3, (err, t_err)
