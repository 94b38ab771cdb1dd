"""The Hopper out-projection in Gluon (`bsmamba2.kernels.gated_proj_sm90`) against `gated_proj_reference`.

Triton's CPU interpreter does not run Gluon: on the CPU the kernel is compiled for sm_90a as the fused block launches
it (registers, spills, shared memory, what its loop issues); the `gpu` tests run it on a Hopper GPU against the
float32 twin and against the Triton kernel it replaces, on the block's layouts.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as the other kernel tests: the Triton kernels interpreted

pytest.importorskip("triton")

from bsmamba2.kernels import gated_proj_sm90  # noqa: E402
from bsmamba2.kernels.gated_proj import gated_proj, gated_proj_reference  # noqa: E402
from bsmamba2.kernels.ssd_sm90 import gluon_importable  # noqa: E402

from test_kernels_sm90 import _compile_stats  # noqa: E402


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _block_layout(rows, e, d, dtype, device, seed, scale=1.0, z_shift=0.0):
    """y (2, rows, e) contiguous; z a view of a (rows, 2, width) in-projection; w (2, e, d) a permuted view of a
    (d, 2, e) matrix: the fused block's layouts (`bimamba2_block_forward`, long sequences)."""
    gen = torch.Generator().manual_seed(seed)
    width = 2 * e + 272
    y = (scale * torch.randn(2, rows, e, generator=gen)).to(device, dtype)
    z = (z_shift + 2 * torch.randn(rows, 2, width, generator=gen)).to(device, dtype)[..., :e].transpose(0, 1)
    w = (torch.randn(d, 2, e, generator=gen) / e**0.5).to(device, dtype).permute(1, 2, 0)
    return y, z, w


def test_applies_only_to_hopper_cuda_inputs_of_the_model_shape():
    y, z, w = _block_layout(10, 64, 256, torch.bfloat16, "cpu", 0)
    assert not gated_proj_sm90.applies(y, z, w)  # CPU tensors: gated_proj runs the Triton kernel


def test_gated_kernel_compiles_for_sm90():
    """Compiled for sm_90a at the paper's size (397,296 rows, e = 1024, d = 256): one program of 8 warps per SM
    without spills, its ring within the SM's shared memory, tensor-core products and cp.async copies in the loop
    (Triton 3.6: 239 registers, 192 KB, 440 loop instructions)."""
    stats = _compile_stats("gated")
    assert stats["kernel"] == "gated" and stats["registers"] <= 255 and stats["stack_bytes"] == 0, stats
    assert stats["shared_bytes"] <= 227 * 1024 and stats["local_memory"] == 0, stats
    assert stats["tensor_core"] > 0 and stats["async_copies"] > 0 and stats["plain_global_loads"] == 0, stats


def _needs_hopper():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs a Hopper GPU")
    if not gluon_importable():
        pytest.skip("this Triton has no Gluon")


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 127, 128, 1000, 6408])  # partial, whole and many row blocks
@pytest.mark.parametrize(
    # e: two steps, the ring filled, the model's; stages: the default ring, the shortest one; outstanding: products
    # left running while the next step's g is formed (the default) or each waited for
    "e, dtype, stages, outstanding",
    [
        (128, torch.bfloat16, "3", "1"),
        (512, torch.float16, "3", "1"),
        (1024, torch.bfloat16, "3", "1"),
        (1024, torch.float16, "3", "1"),
        (512, torch.bfloat16, "2", "1"),
        (1024, torch.bfloat16, "3", "0"),
    ],
)
def test_gpu_gated_proj_sm90_matches_reference(rows, e, dtype, stages, outstanding, monkeypatch):
    """P and Σg² against the float32 twin, within what the Triton kernel reaches on the same inputs."""
    _needs_hopper()
    monkeypatch.setenv("BSMAMBA2_GP_SM90_STAGES", stages)
    monkeypatch.setenv("BSMAMBA2_GP_SM90_OUTSTANDING", outstanding)
    y, z, w = _block_layout(rows, e, 256, dtype, "cuda", seed=rows + e)
    assert gated_proj_sm90.applies(y, z, w)
    p, ss = gated_proj(y, z, w)
    p_ref, ss_ref = gated_proj_reference(y.float(), z.float(), w.float())
    monkeypatch.setenv("BSMAMBA2_GP_GLUON", "0")
    p_t, ss_t = gated_proj(y, z, w)
    assert p.shape == (2, rows, 256) and p.dtype == dtype and ss.shape == (2, rows) and ss.dtype == torch.float32
    assert torch.isfinite(p).all() and torch.isfinite(ss).all()
    assert rel(p, p_ref) < 1e-2 and rel(ss, ss_ref) < 1e-3, (rel(p, p_ref), rel(ss, ss_ref))
    assert rel(p, p_ref) < 1.5 * rel(p_t, p_ref) + 1e-4 and rel(ss, ss_ref) < 1.5 * rel(ss_t, ss_ref) + 1e-4


@pytest.mark.gpu
def test_gpu_gated_proj_sm90_float16_large_values():
    """|g| far above 256 in float16: Σg² is summed in float32, finite and matching the twin."""
    _needs_hopper()
    y, z, w = _block_layout(333, 1024, 256, torch.float16, "cuda", seed=1, scale=300.0, z_shift=3.0)
    assert gated_proj_sm90.applies(y, z, w)
    p, ss = gated_proj(y, z, w)
    p_ref, ss_ref = gated_proj_reference(y.float(), z.float(), w.float())
    assert torch.isfinite(ss).all() and torch.isfinite(p).all()
    assert rel(ss, ss_ref) < 1e-3 and rel(p, p_ref) < 1e-2


@pytest.mark.gpu
def test_gpu_gated_proj_sm90_declines_other_layouts():
    """Shapes it does not compute go to the Triton kernel: another column count, e not a multiple of 64 or a single
    step of it, W with its unit stride along the columns, float32."""
    _needs_hopper()
    y, z, w = _block_layout(100, 1024, 256, torch.bfloat16, "cuda", seed=2)
    assert not gated_proj_sm90.applies(y, z, w[..., :128])
    assert not gated_proj_sm90.applies(y[..., :96], z[..., :96], w[:, :96])
    assert not gated_proj_sm90.applies(y[..., :64], z[..., :64], w[:, :64])
    assert not gated_proj_sm90.applies(y, z, w.contiguous())
    assert not gated_proj_sm90.applies(y.float(), z.float(), w.float())
    assert os.environ.get("BSMAMBA2_GP_GLUON") is None
