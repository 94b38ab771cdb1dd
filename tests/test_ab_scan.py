"""tools/ab_scan.py: the A/B computes the same scan in every variant it times (float32 products through
Triton's CPU interpreter at a tiny size), against the baseline module's float32 scan and the float64 plain path."""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("BSMAMBA2_SSD_BLOCK", "16")  # several chunks at tiny lengths

pytest.importorskip("triton")

from bsmamba2.ssd import ssd_chunked  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_ab_scan_variants_compute_the_plain_scan(tool_script):
    ab = tool_script("ab_scan")
    base = ab.load_baseline(str(ROOT / "src" / "bsmamba2" / "kernels" / "ssd.py"))
    variants = [ab.parse_variant("stages2:BSMAMBA2_SSD_STAGES=2"), ab.parse_variant("default")]
    assert variants[0] == ("stages2", {"BSMAMBA2_SSD_STAGES": "2"})
    res = ab.bench_kernel(base, variants, seqs=1, length=37, rounds=0)
    errors = res["error_vs_baseline_fp32"]
    assert set(errors) == {"baseline", "stages2", "default"}
    assert all(e < 1e-2 for e in errors.values()), errors  # bf16 inputs against their float32 scan
    assert os.environ.get("BSMAMBA2_SSD_STAGES") is None  # the variant's setting did not leak
    # the baseline's float32 scan is the plain scan: forward half as is, backward half flipped
    x, dt, A, B, C, D = ab.scan_inputs(1, 37, device="cpu")
    y = base.ssd_fwd(x.float(), dt, A, B.float(), C.float(), D, 2)
    for k, flip in ((0, False), (1, True)):
        f = (lambda t: t.flip(1)) if flip else (lambda t: t)
        ref = f(ssd_chunked(*(f(t[k:k + 1].double()) for t in (x, dt)), A[k].double(),
                            *(f(t[k:k + 1].double()) for t in (B, C)), D[k].double(), chunk_size=16))
        assert ab.common.rel_error(y[k:k + 1], ref) < 1e-4


def test_ab_scan_band_part_checks_each_variant(tool_script, monkeypatch):
    """The `band` part runs the fused band-axis call as the block does (views of one in-projection, every fused
    option) per variant, checked against the same call in float32, and leaks no variant's setting."""
    monkeypatch.setenv("BSMAMBA2_SSD_BLOCK", "64")  # the 62 bands in one chunk, as on the GPU
    ab = tool_script("ab_scan")
    variants = [ab.parse_variant("default"), ab.parse_variant("flat:BSMAMBA2_SSD_HEADS_FIRST=0")]
    res = ab.bench_band(variants, seqs=1, rounds=0)
    assert res["shape"] == [2, 62, 16, 64, 128]
    errors = res["error_vs_fp32"]
    assert set(errors) == {"default", "flat"}
    assert all(0 < e < 2e-2 for pair in errors.values() for e in pair), errors  # bf16 g and Σg² vs float32
    assert os.environ.get("BSMAMBA2_SSD_HEADS_FIRST") is None
    x, dt, A, B, C, D, opt = ab.band_inputs(1, device="cpu")
    assert x.shape == (2, 62, 16, 64) and B.shape == (2, 62, 1, 128) and opt["z"].shape == x.shape
    assert x.data_ptr() != opt["z"].data_ptr() and x.untyped_storage().data_ptr() == B.untyped_storage().data_ptr()
    assert opt["x_conv"][0].stride(1) == 1  # tap-major, as the fused block keeps the conv weight


def test_ab_scan_backward_part_checks_each_variant(tool_script):
    """The `backward` part runs `ssd_bwd` on both axes (several chunks; one) with the mixer's layout per variant,
    checks all six gradients against the float32 per-head kernel, and leaks no variant's setting."""
    ab = tool_script("ab_scan")
    variants = [ab.parse_variant(v) for v in ("grouped:BSMAMBA2_SSD_BWD_GROUPED=1",
                                              "perhead:BSMAMBA2_SSD_BWD_GROUPED=0",
                                              "oneloop:BSMAMBA2_SSD_BWD_GROUPED=1,BSMAMBA2_SSD_BWD_SPLIT=0")]
    res = ab.bench_backward(variants, {"time": (1, 37), "band": (1, 13)}, rounds=0)
    assert res["time"]["shape"] == [2, 37, 16, 64, 128] and res["band"]["shape"] == [2, 13, 16, 64, 128]
    for axis in ("time", "band"):
        errors = res[axis]["error_vs_fp32_per_head"]
        assert set(errors) == {"grouped", "perhead", "oneloop"}
        for name, e in errors.items():
            assert set(e) == set(ab.GRADIENTS)
            # bf16 inputs are exact in float32 and the interpreter's products are float32: what differs is the
            # rounding of bf16 outputs and buffers (dx, dB, dC, the states; the per-head kernel's per-head buffers)
            assert all(e[k] < 1e-2 for k in ab.GRADIENTS), (axis, name, e)
        assert errors["grouped"]["dB"] < errors["perhead"]["dB"]  # one rounding of the head sum, not one per head
    assert os.environ.get("BSMAMBA2_SSD_BWD_GROUPED") is None and os.environ.get("BSMAMBA2_SSD_BWD_SPLIT") is None
