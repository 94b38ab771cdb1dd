"""Reduced-precision projections on the CPU (`bsmamba2.quantize`): int8 and bf16 close to fp32, really in the lower
precision, quiet; bf16 against its plain twin."""

import warnings

import pytest
import torch
from torch import nn

from bsmamba2.build import build_model
from bsmamba2.config import BSMamba2Config
from bsmamba2.quantize import Bf16Linear, linear_bf16, quantize_linear_int8


@pytest.mark.parametrize("make, snr_min", [(quantize_linear_int8, 15), (linear_bf16, 25)])
def test_reduced_precision_copy_replaces_every_linear_stays_close_and_warns_nothing(make, snr_min):
    model = build_model(BSMamba2Config.tiny()).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = make(model)
    assert [str(w.message) for w in caught] == []  # torch's deprecation notes are not the user's business
    assert not any(type(m) is nn.Linear for m in fast.modules())  # every Linear replaced
    assert any(type(m) is nn.Linear for m in model.modules())  # on a copy: the float model is untouched
    if make is linear_bf16:
        assert sum(isinstance(m, Bf16Linear) for m in fast.modules()) == sum(type(m) is nn.Linear
                                                                             for m in model.modules())
    wave = 0.3 * torch.randn(1, 2, 22050)
    with torch.no_grad():
        ref, out = model.forward_waveform(wave), fast.forward_waveform(wave)
    snr = float(10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()))
    assert snr_min < snr < 200  # close to fp32, and not fp32 itself


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 96), (3, 50, 96), (2001, 96)])
def test_bf16_linear_equals_its_plain_twin(bias, shape):
    linear = nn.Linear(96, 200, bias=bias)
    fast = Bf16Linear(linear)
    x = torch.randn(*shape)
    with torch.no_grad():
        out, twin, full = fast(x), fast.reference(x), linear(x)
    assert out.dtype == torch.float32 and out.shape == full.shape
    # the same bf16 operands and roundings: equal but for a rare one-ulp tie broken by the summation order
    assert (out == twin).float().mean() >= 0.999
    assert float((out - twin).norm() / twin.norm()) < 1e-4
    # and a bf16 product, not float32: about 2^-9 from the float32 Linear
    assert 1e-4 < float((out - full).norm() / full.norm()) < 1e-2


@pytest.mark.parametrize("machine, flags, speedup, native", [
    ("x86_64", {"avx512f", "avx512_bf16"}, 0.5, True),  # Linux x86: the flags decide, not the timing
    ("x86_64", {"amx_bf16", "amx_tile"}, 0.5, True),
    ("x86_64", {"avx512f", "avx2"}, 9.0, False),
    ("aarch64", {"fp", "asimd", "bf16"}, 3.0, True),  # elsewhere the timing
    ("aarch64", {"fp", "asimd"}, 0.8, False),
    ("arm64", None, 2.5, True),  # no /proc/cpuinfo (macOS, Windows)
    ("AMD64", None, 1.2, False),
])
def test_cpu_bf16_native_by_flags_on_linux_x86_else_by_timing(monkeypatch, machine, flags, speedup, native):
    from bsmamba2 import device  # noqa: PLC0415

    monkeypatch.setattr(device.platform, "machine", lambda: machine)
    monkeypatch.setattr(device, "cpu_flags", lambda: None if flags is None else frozenset(flags))
    monkeypatch.setattr(device, "cpu_bf16_speedup", lambda: speedup)
    assert device.cpu_bf16_native() is native


def test_cpu_bf16_probe_and_flags_on_this_machine():
    from bsmamba2 import device  # noqa: PLC0415

    speedup = device.cpu_bf16_speedup()
    assert speedup > 0 and device.cpu_bf16_speedup() == speedup  # timed once per process
    flags = device.cpu_flags()
    assert flags is None or "fpu" in flags or "fp" in flags  # read from /proc/cpuinfo where it exists
