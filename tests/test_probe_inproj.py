"""benchmarks/probe_inproj.py: the probe's kernels compute what they are timed against, on fresh random inputs
(float32 through Triton's CPU interpreter at tiny sizes), so the numbers it reports stay comparisons of one function.

Plain twins: the in-projection as `x @ Wᵀ`, then `F.conv1d` + SiLU per direction (direction 1 on the flipped
sequence, flipped back), and `gated_proj_reference` on the gate the in-projection would have written.
"""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

from bsmamba2.kernels.gated_proj import gated_proj_reference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _probe():
    spec = importlib.util.spec_from_file_location("probe_inproj", ROOT / "benchmarks" / "probe_inproj.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plain_inproj_conv(xn, w_xbc, conv_w, conv_b, s, l):
    """(2, s·l, c): silu(conv1d(xn W_dᵀ)) per direction, direction 1 anti-causal."""
    outs = []
    for d in range(2):
        raw = (xn @ w_xbc[d].t()).view(s, l, -1).transpose(1, 2)  # (s, c, l)
        raw = raw.flip(-1) if d else raw
        k = conv_w.shape[-1]
        o = F.silu(F.conv1d(raw, conv_w[d][:, None], conv_b[d], padding=k - 1, groups=raw.shape[1])[..., :l])
        outs.append((o.flip(-1) if d else o).transpose(1, 2).reshape(s * l, -1))
    return torch.stack(outs)


@pytest.mark.parametrize("variant", ["dot", "scratch"])
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 64)])
def test_conv_epilogue_matches_plain(variant, block_m, block_n):
    probe = _probe()
    s, l, d, c, k = 3, 37, 32, 48, 4  # tiles overlap sequence ends and the matrix's first and last rows
    xn = torch.randn(s * l, d, device=DEV)
    w_xbc = torch.randn(2, c, d, device=DEV) / 4
    conv_w, conv_b = torch.randn(2, c, k, device=DEV) / 2, torch.randn(2, c, device=DEV) / 4
    out = probe.inproj_conv(xn, w_xbc, conv_w, conv_b, l, variant, block_m, block_n, 16, 4, 1, 1)
    ref = plain_inproj_conv(xn, w_xbc, conv_w, conv_b, s, l)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_gate_recomputed_matches_plain():
    probe = _probe()
    r, d, e, n = 50, 32, 48, 16
    xn, wz = torch.randn(r, d, device=DEV), torch.randn(2, e, d, device=DEV) / 4
    w, y = torch.randn(2, e, n, device=DEV) / 4, torch.randn(2, r, e, device=DEV)
    p, ss = probe.gated_proj_z(y, xn, wz, w, 16, 16, 16, 4, 1)
    p_ref, ss_ref = gated_proj_reference(y, torch.einsum("rk,dek->dre", xn, wz), w)
    assert torch.allclose(p, p_ref, rtol=1e-4, atol=1e-4) and torch.allclose(ss, ss_ref, rtol=1e-4)


def test_tma_gemm_matches_plain():
    probe = _probe()
    a, w = torch.randn(100, 64, device=DEV), torch.randn(48, 64, device=DEV)
    assert torch.allclose(probe.mm_tma(a, w, 32, 16, 16, 4, 1, 1), a @ w.t(), rtol=1e-4, atol=1e-4)
