"""Dynamic int8 quantization of a model's Linear projections for CPU inference (`--precision int8`).

Weights are stored as int8 per output channel; activations are quantized per call from their observed range, so no
calibration data is needed. The scan, the norms, the STFT and everything else stay float32. The ONNX Runtime twin is
`bsmamba2.onnx_backend.quantize_onnx_int8`.
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import nn

log = logging.getLogger(__name__)


def quantize_linear_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` (CPU, float32) with every `nn.Linear` replaced by a dynamically quantized int8 Linear.

    The model's other attributes (config, stems, …) are kept, so it runs wherever the float model runs on the CPU.
    """
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("int8 quantization runs on the CPU; move the model there (or pass --device cpu)")
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao, once per layer
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"(?s).*quantize_per_tensor.*deprecated", category=UserWarning)
        from torch.ao.quantization import quantize_dynamic  # noqa: PLC0415

        quantized = quantize_dynamic(copy.deepcopy(model).float().eval(), {nn.Linear}, dtype=torch.qint8)
    n = sum(1 for m in model.modules() if isinstance(m, nn.Linear))
    log.debug("quantized %d Linear layers to int8 (dynamic)", n)
    return quantized
