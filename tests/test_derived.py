"""Cached derived weights: reused without autograd while the parameters are unchanged, rebuilt after any change."""

import torch
from torch import nn

from bsmamba2 import derived as dv
from bsmamba2.spectral import BandSplit, MaskEstimator


def test_cached_until_a_source_changes():
    lin = nn.Linear(4, 3)
    calls = []

    def build():
        calls.append(1)
        return lin.weight * 2

    with torch.no_grad():
        first = dv.derived(lin, "w2", [lin.weight], build)
        assert dv.derived(lin, "w2", [lin.weight], build) is first and len(calls) == 1
        lin.weight.add_(1.0)  # in place: the version counter moves
        second = dv.derived(lin, "w2", [lin.weight], build)
        assert len(calls) == 2 and torch.equal(second, lin.weight * 2)
        torch._foreach_lerp_([lin.weight], [torch.zeros_like(lin.weight)], 0.5)  # bumps the counter on the CPU only
        assert torch.equal(dv.derived(lin, "w2", [lin.weight], build), lin.weight * 2) and len(calls) == 3
        lin.load_state_dict({"weight": torch.ones(3, 4), "bias": torch.zeros(3)})
        assert torch.equal(dv.derived(lin, "w2", [lin.weight], build), torch.full((3, 4), 2.0))
        dv.clear(lin)
        dv.derived(lin, "w2", [lin.weight], build)
        assert len(calls) == 5
    out = dv.derived(lin, "w2", [lin.weight], build)  # with autograd: always built, so gradients flow
    assert len(calls) == 6 and out.requires_grad


def test_an_optimizer_step_invalidates_the_cache_even_without_version_bumps():
    """CUDA's fused and foreach optimizer kernels leave the version counters as they were; replayed with an optimizer
    that writes through `.data`. Any optimizer step drops what was cached."""

    class DataSGD(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.5})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.add_(p.grad.data, alpha=-group["lr"])

    lin = nn.Linear(4, 3)
    opt = DataSGD(lin.parameters())
    with torch.no_grad():
        before = dv.derived(lin, "w2", [lin.weight], lambda: lin.weight * 2)
    version = lin.weight._version
    lin(torch.randn(5, 4)).sum().backward()
    opt.step()
    assert lin.weight._version == version  # the counter did not move
    with torch.no_grad():
        after = dv.derived(lin, "w2", [lin.weight], lambda: lin.weight * 2)
    assert not torch.equal(after, before) and torch.equal(after, lin.weight * 2)


def test_grouped_band_layers_follow_parameter_updates():
    torch.manual_seed(0)
    sizes = (4, 4, 6, 8)
    split, est = BandSplit(8, sizes, grouped=True), MaskEstimator(8, sizes, grouped=True)
    x = torch.randn(2, 3, sum(sizes))
    with torch.no_grad():
        before = est(split(x))
        assert torch.equal(est(split(x)), before)  # second call from the cache
        for p in list(split.parameters()) + list(est.parameters()):
            p.mul_(1.5)
        after = est(split(x))
        split.grouped = est.grouped = False
        reference = est(split(x))  # the per-band loop, no cache involved
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, reference, rtol=1e-5, atol=1e-6)


def test_autocast_casts_cached_until_a_source_changes():
    lin = nn.Linear(4, 3)
    w = lin.weight * 2
    assert dv.in_autocast_dtype(lin, "w2", [lin.weight], (w,), "cpu")[0] is w  # no autocast: unchanged
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (cast,) = dv.in_autocast_dtype(lin, "w2", [lin.weight], (w,), "cpu")  # with autograd: cast, not cached
        assert cast.dtype == torch.bfloat16 and cast.requires_grad
        with torch.no_grad():
            (first,) = dv.in_autocast_dtype(lin, "w2", [lin.weight], (w,), "cpu")
            assert first.dtype == torch.bfloat16 and torch.equal(first, w.to(torch.bfloat16))
            assert dv.in_autocast_dtype(lin, "w2", [lin.weight], (w,), "cpu")[0] is first  # cast once
            lin.weight.mul_(3.0)
            w3 = lin.weight * 2
            (again,) = dv.in_autocast_dtype(lin, "w2", [lin.weight], (w3,), "cpu")
            assert torch.equal(again, w3.to(torch.bfloat16))
