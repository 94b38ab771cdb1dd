"""Reduced-precision projections on the CPU (`bsmamba2.quantize`): int8 and bf16 close to fp32, really in the lower
precision, quiet; bf16 against its plain twin."""

import warnings

import pytest
import torch
from torch import nn

from bsmamba2.build import build_model
from bsmamba2.config import BSMamba2Config
from bsmamba2.quantize import Bf16Linear, linear_bf16, quantize_linear_int8


def test_int8_copy_is_close_quantized_and_warns_nothing():
    model = build_model(BSMamba2Config.tiny()).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = quantize_linear_int8(model)
    assert [str(w.message) for w in caught] == []  # torch's deprecation notes are not the user's business
    assert not any(type(m) is nn.Linear for m in q.modules())  # every Linear replaced
    assert any(type(m) is nn.Linear for m in model.modules())  # on a copy: the float model is untouched
    wave = 0.3 * torch.randn(1, 2, 22050)
    with torch.no_grad():
        ref, out = model.forward_waveform(wave), q.forward_waveform(wave)
    snr = float(10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()))
    assert 15 < snr < 200  # close to fp32, and not fp32 itself


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


def test_bf16_copy_replaces_every_linear_and_stays_close():
    model = build_model(BSMamba2Config.tiny()).eval()
    fast = linear_bf16(model)
    assert not any(type(m) is nn.Linear for m in fast.modules())
    assert sum(isinstance(m, Bf16Linear) for m in fast.modules()) == sum(type(m) is nn.Linear for m in model.modules())
    assert any(type(m) is nn.Linear for m in model.modules())  # on a copy: the float model is untouched
    wave = 0.3 * torch.randn(1, 2, 22050)
    with torch.no_grad():
        ref, out = model.forward_waveform(wave), fast.forward_waveform(wave)
    snr = float(10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()))
    assert 25 < snr < 200  # close to fp32, and not fp32 itself
