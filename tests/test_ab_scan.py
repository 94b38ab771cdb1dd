"""benchmarks/ab_scan.py: the A/B computes the same scan in every variant it times (float32 products through
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


def test_ab_scan_variants_compute_the_plain_scan(benchmark_script):
    ab = benchmark_script("ab_scan")
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
        assert ab.bench_gpu._rel(y[k:k + 1], ref) < 1e-4
