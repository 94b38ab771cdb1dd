"""Dynamic int8 projections on the CPU (`bsmamba2.quantize`): close to fp32, really quantized, and quiet."""

import warnings

import torch
from torch import nn

from bsmamba2.build import build_model
from bsmamba2.config import BSMamba2Config
from bsmamba2.quantize import quantize_linear_int8


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
