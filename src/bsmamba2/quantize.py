"""A model's Linear projections in reduced precision for CPU inference; the scan, the norms, the STFT and everything
else stay float32.

- int8 (`--precision int8`): dynamic quantization. Weights are stored as int8 per output channel; activations are
  quantized per call from their observed range, so no calibration data is needed. The ONNX Runtime twin is
  `bsmamba2.onnx_backend.quantize_onnx_int8`.
- bf16 (`--precision bf16` on a CPU, and the CPU's default where it multiplies bf16 natively,
  `bsmamba2.device.cpu_bf16_native`): weights stored in bfloat16, each input rounded to bfloat16, the product
  accumulated in float32 by oneDNN and rounded to bfloat16 once more, the bias added in float32. Its plain twin is
  `Bf16Linear.reference`.
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


class Bf16Linear(nn.Module):
    """An `nn.Linear` for inference whose product runs in bfloat16 (see the module's docstring); float32 in and out."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x.to(torch.bfloat16), self.weight).float()  # a new tensor: the bias goes in in place
        return y if self.bias is None else y.add_(self.bias)

    def reference(self, x: Tensor) -> Tensor:
        """The same function in plain float32 arithmetic: the product of the bf16-rounded operands, rounded to bf16."""
        y = (x.to(torch.bfloat16).float() @ self.weight.float().t()).to(torch.bfloat16).float()
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def linear_bf16(model: nn.Module) -> nn.Module:
    """A copy of `model` (float32) with every `nn.Linear` replaced by a `Bf16Linear`; other attributes kept."""
    copied = copy.deepcopy(model).float().eval()
    names = [name for name, m in copied.named_modules() if type(m) is nn.Linear]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = copied.get_submodule(parent_name)
        setattr(parent, child, Bf16Linear(getattr(parent, child)))
    log.debug("%d Linear layers in bf16", len(names))
    return copied
