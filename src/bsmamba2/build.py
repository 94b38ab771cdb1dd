"""The model a config describes: `build_model(BSMamba2Config)` → BSMamba2, `build_model(RoFormerConfig)` → the
BS-RoFormer baseline. The one place that knows both architectures, so neither model module imports the other."""

from __future__ import annotations

from torch import nn

from bsmamba2.bandsplit import BandSplitModel
from bsmamba2.config import BSMamba2Config, ModelConfig, RoFormerConfig
from bsmamba2.model import BSMamba2
from bsmamba2.roformer import BSRoFormer


def build_model(config: ModelConfig) -> BandSplitModel:
    """The model class that `config` describes (BSMamba2 or BS-RoFormer), freshly initialised."""
    if isinstance(config, BSMamba2Config):
        return BSMamba2(config)
    if isinstance(config, RoFormerConfig):
        return BSRoFormer(config)
    raise TypeError(f"not a model config: {type(config).__name__}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
