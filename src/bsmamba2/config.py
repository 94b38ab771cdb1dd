"""Model configurations: nested dataclasses that a checkpoint stores so a model can be rebuilt from the file alone."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Widths (in STFT bins) of the 62 sub-bands over the 1025 bins of a 2048-point STFT, low to high:
# 24 bands of 2, 12 of 4, 8 of 12, 8 of 24, 8 of 48, then 128 and 129.
PAPER_BAND_WIDTHS: tuple[int, ...] = (2,) * 24 + (4,) * 12 + (12,) * 8 + (24,) * 8 + (48,) * 8 + (128, 129)


@dataclass
class Mamba2Config:
    """Sizes of one Mamba2 mixer, named as in mamba_ssm.modules.mamba2.Mamba2."""

    expand: int = 4
    d_state: int = 128
    headdim: int = 64
    d_conv: int = 4
    ngroups: int = 1
    chunk_size: int = 256


@dataclass
class STFTConfig:
    """The paper's analysis: periodic Hann, center=True with reflect padding."""

    sample_rate: int = 44100
    n_fft: int = 2048
    hop_length: int = 441


@dataclass
class BSMamba2Config:
    """BSMamba2 (Kim & Choi 2025). Defaults are the paper's size: D=256, L=6, 48,098,188 parameters."""

    dim: int = 256
    depth: int = 6
    stereo: bool = True
    stems: tuple[str, ...] = ("vocals",)
    band_widths: tuple[int, ...] = PAPER_BAND_WIDTHS
    mask_estimator_depth: int = 2
    mamba: Mamba2Config = field(default_factory=Mamba2Config)
    stft: STFTConfig = field(default_factory=STFTConfig)
    arch: str = "bsmamba2"

    @classmethod
    def tiny(cls, **overrides: Any) -> "BSMamba2Config":
        """A few-thousand-parameter model for tests: same band split, small mixers."""
        base = dict(dim=16, depth=1, mamba=Mamba2Config(expand=2, d_state=8, headdim=8, chunk_size=16))
        base.update(overrides)
        return cls(**base)


@dataclass
class RoFormerConfig:
    """BS-RoFormer baseline on the same band split. Paper baseline: D=384, L=6, 8 heads of 48."""

    dim: int = 384
    depth: int = 6
    stereo: bool = True
    stems: tuple[str, ...] = ("vocals",)
    band_widths: tuple[int, ...] = PAPER_BAND_WIDTHS
    mask_estimator_depth: int = 2
    heads: int = 8
    dim_head: int = 48
    ff_mult: int = 4
    attn_dropout: float = 0.0
    ff_dropout: float = 0.0
    stft: STFTConfig = field(default_factory=STFTConfig)
    arch: str = "bsroformer"

    @classmethod
    def tiny(cls, **overrides: Any) -> "RoFormerConfig":
        base = dict(dim=16, depth=1, heads=2, dim_head=8)
        base.update(overrides)
        return cls(**base)


ModelConfig = BSMamba2Config | RoFormerConfig
_ARCHS = {"bsmamba2": BSMamba2Config, "bsroformer": RoFormerConfig}
_NESTED = {"mamba": Mamba2Config, "stft": STFTConfig}


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """Plain JSON-able dict (tuples become lists)."""
    return dataclasses.asdict(config)


def checked_setting(value: Any, default: Any, where: str) -> Any:
    """`value` for a setting whose default is `default`: a number where the default is an int or a float, true/false
    where it is a bool (other settings, e.g. those that may be null or a word, pass as they are)."""
    if value is None or default is None or isinstance(default, str) or default is dataclasses.MISSING:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        if isinstance(default, int):
            if value != int(value):
                raise ValueError(f"{where}: expected a whole number, got {value!r}")
            return int(value)
        return float(value)
    return value


def _checked_fields(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """`data` with each plain setting checked against its field's default (`checked_setting`)."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return {k: checked_setting(v, defaults.get(k), f"{where}.{k}") for k, v in data.items()}


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Inverse of `config_to_dict`; unknown keys are an error so typos surface."""
    data = dict(data)
    arch = data.get("arch", "bsmamba2")
    if arch not in _ARCHS:
        raise ValueError(f"unknown model arch {arch!r}; expected one of {sorted(_ARCHS)}")
    cls = _ARCHS[arch]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    data = _checked_fields(cls, data, "model")
    for key, sub in _NESTED.items():
        if key in data and isinstance(data[key], dict):
            data[key] = sub(**_checked_fields(sub, data[key], f"model.{key}"))
    for key in ("stems", "band_widths"):
        if key in data:
            data[key] = tuple(data[key])
    return cls(**data)
