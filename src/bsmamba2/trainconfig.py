"""Training run settings: nested dataclasses read from YAML, overridable with `--set section.key=value`.

A run file has three sections::

    model:  a BSMamba2Config or RoFormerConfig as a dict (`arch` picks which)
    data:   DataConfig   (where the songs are, excerpt length, random-mixing probabilities, activity detection)
    train:  TrainConfig  (optimiser, batch, precision, EMA, loss, checkpoints, logging)

`load_run_config("bsmamba2-paper.yaml", ["train.lr=3e-4"])` resolves a bare name against the configs shipped in the
package (`bsmamba2/configs/`), applies the overrides to the raw dict (so nested model fields such as
`model.mamba.d_state=64` work too) and validates every key, so a typo is an error rather than a silent default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from bsmamba2.config import ModelConfig, checked_setting, config_from_dict, config_to_dict

# The paper's validation split: 14 tracks of the MUSDB18-HQ training set, held out by name.
PAPER_VALID_TRACKS: tuple[str, ...] = (
    "Actions - One Minute Smile",
    "Clara Berry And Wooldog - Waltz For My Victims",
    "Johnny Lokke - Promises & Lies",
    "Patrick Talbot - A Reason To Leave",
    "Triviul - Angelsaint",
    "Alexander Ross - Goodbye Bolero",
    "Fergessen - Nos Palpitants",
    "Leaf - Summerghost",
    "Skelpolu - Human Mistakes",
    "Young Griffo - Pennies",
    "ANiMAL - Rockshow",
    "James May - On The Line",
    "Meaxic - Take A Step",
    "Traffic Experiment - Sirens",
)


@dataclass
class SalienceConfig:
    """Source salience (activity) detection for drawing training segments, as in the paper: windows of
    `DataConfig.segment_seconds`. Not `metrics.ActivityConfig`, the vocal-activity detector of the evaluation.

    A window (hop = window * (1 - overlap)) is split into `n_chunks` chunks; it is salient when more than
    `min_active_fraction` of its chunks have an RMS above the window's `quantile` chunk RMS, floored at `rms_floor`,
    in every channel.
    """

    overlap: float = 0.5
    n_chunks: int = 10
    quantile: float = 0.15
    rms_floor: float = 1e-3
    min_active_fraction: float = 0.5
    eps: float = 1e-5


@dataclass
class DataConfig:
    """Where the songs are and how training mixtures are drawn."""

    root: str | None = None  # MUSDB18-HQ layout; the CLI's --data overrides it
    stems: tuple[str, ...] = ("vocals", "drums", "bass", "other")
    sample_rate: int = 44100
    segment_seconds: float = 8.0
    silence_prob: float = 0.1
    gain_min: float = 0.5
    gain_max: float = 1.5
    polarity_prob: float = 0.0  # per stem: invert its polarity (not in the paper; 0 keeps its recipe)
    channel_swap_prob: float = 0.0  # per stem: swap left and right (not in the paper; 0 keeps its recipe)
    # None: the paper's 14 tracks (or every track of ROOT/valid/ when that folder exists).
    valid_tracks: tuple[str, ...] | None = None
    valid_max_excerpts: int | None = None  # cap on aligned validation excerpts (evenly spaced); None: all
    num_workers: int = 4
    cache_dir: str | None = None  # activity cache; None: ROOT/.bsmamba2-cache, else ~/.cache/bsmamba2
    activity: SalienceConfig = field(default_factory=SalienceConfig)


@dataclass
class TrainConfig:
    """The optimisation recipe. Defaults are the paper's (AdamW 5e-4, bf16, clip 3, EMA 0.999, batch 60)."""

    seed: int = 42
    # fine-tuning: a new run starts from these weights instead of random ones (a model name such as bsmamba2-musdb or
    # demo, a checkpoint path, URL or hf:// id; its model config must be the run's); the optimiser and the schedule
    # start fresh; a resumed run takes its weights from last.pt and ignores this
    init_from: str | None = None
    # with init_from: the run's model may be deeper than the checkpoint's (all else equal): the checkpoint fills the
    # first layers and each extra layer starts as the identity (`BandSplitModel.make_identity`), so the run starts
    # from the checkpoint's function
    grow_depth: bool = False
    lr: float = 5e-4
    # learning rate by optimiser step (the paper: constant): linear warm-up from 0 over warmup_steps, then, when
    # decay_steps > 0, a half cosine from lr down to lr * final_lr_fraction over the next decay_steps, held after
    warmup_steps: int = 0
    decay_steps: int = 0
    final_lr_fraction: float = 0.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 5  # per process (GPU)
    effective_batch: int = 60  # batch_size * world_size * accumulation; accumulation adapts to the world size
    grad_clip: float = 3.0
    ema_decay: float = 0.999
    precision: str = "bf16"  # bf16 | fp16 | fp32; autocast only on CUDA, CPU always trains in float32
    epochs: int = 2000
    epoch_samples: int = 6000  # training mixtures per epoch (all processes together)
    max_steps: int | None = None  # stop after this many optimiser steps (None: epochs * steps_per_epoch)
    time_limit_minutes: float | None = None  # stop (saving last.pt) after this much wall time; resume continues
    valid_batch_size: int = 5
    valid_every_epochs: int = 1
    save_every_steps: int = 100  # also write last.pt every this many optimiser steps (0: only at epoch ends)
    log_every_steps: int = 10
    # auto: before the first step, measure the step's memory and recompute (checkpoint) only as many axis modules as
    # the GPU's free memory needs, all kept where they fit (bsmamba2.memory; none on CPU); true: all; false: none
    activation_checkpointing: bool | str = "auto"
    memory_margin: float = 0.05  # auto: least allowance for fragmentation (fraction of the peak); raise it on OOM
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False
    # loss: time_weight * L1(time) + sum over windows of mean |STFT difference| (hop stft_hop, n_fft >= stft_min_nfft)
    time_weight: float = 10.0
    stft_windows: tuple[int, ...] = (4096, 2048, 1024, 512, 256)
    stft_hop: int = 147
    stft_min_nfft: int = 2048
    # not in the paper: + silence_weight * the estimate's leakage where a target stem is silent, in dB against the
    # mixture there, softly floored at silence_floor_db (bsmamba2.losses.SilentLeakageLoss); 0 turns it off
    silence_weight: float = 0.0
    silence_floor_db: float = -50.0


@dataclass
class RunConfig:
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_SECTIONS = {"data": DataConfig, "train": TrainConfig}


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    """Dataclass from a dict, recursing into nested dataclass fields; unknown keys are an error."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in raw.items():
        default = fields[name].default_factory if fields[name].default_factory is not dataclasses.MISSING else None
        nested = default() if default is not None else None
        if dataclasses.is_dataclass(nested):
            kwargs[name] = _build(type(nested), value or {}, f"{where}.{name}")
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = checked_setting(value, fields[name].default, f"{where}.{name}")
    return cls(**kwargs)


def run_config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """RunConfig from a plain dict (the YAML's content, or a checkpoint's stored config)."""
    raw = dict(raw)
    unknown = sorted(set(raw) - {"model", *_SECTIONS})
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; expected model, data, train")
    if "model" not in raw:
        raise ValueError("config has no 'model' section; start from bsmamba2-paper.yaml or tiny.yaml")
    model = config_from_dict(raw["model"])
    data = _build(DataConfig, raw.get("data") or {}, "data")
    train = _build(TrainConfig, raw.get("train") or {}, "train")
    return RunConfig(model=model, data=data, train=train)


def run_config_to_dict(config: RunConfig) -> dict[str, Any]:
    """Plain, YAML/JSON-able dict (tuples become lists)."""

    def plain(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: plain(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [plain(v) for v in obj]
        return obj

    return {
        "model": plain(config_to_dict(config.model)),
        "data": plain(dataclasses.asdict(config.data)),
        "train": plain(dataclasses.asdict(config.train)),
    }


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings to a nested dict; values are parsed as YAML (`3e-4`, `true`, `[1, 2]`, `null`)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. train.lr=3e-4")
        dotted, text = item.split("=", 1)
        keys = [k for k in dotted.strip().split(".") if k]
        if len(keys) < 2:
            raise ValueError(f"override {item!r} must name a section and a key, e.g. train.lr=3e-4")
        value = yaml.safe_load(text) if text.strip() else None
        if isinstance(value, str) and _looks_numeric(value):
            value = float(value)  # YAML 1.1 reads "3e-4" as a string
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {key!r} is not a section")
        node[keys[-1]] = value
    return raw


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def resolve_config_path(name: str | Path) -> Path:
    """A path on disk, or the name of a config shipped with the package (`tiny`, `bsmamba2-paper.yaml`)."""
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    shipped = resources.files("bsmamba2") / "configs" / stem
    if shipped.is_file():
        return Path(str(shipped))
    raise FileNotFoundError(f"config {str(name)!r} not found; give a YAML path or one of {shipped_configs()}")


def shipped_configs() -> list[str]:
    folder = resources.files("bsmamba2") / "configs"
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_run_config(name: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a run config (path or shipped name) and apply `--set` style overrides."""
    path = resolve_config_path(name)
    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with model/data/train sections")
    return run_config_from_dict(apply_overrides(raw, overrides))
