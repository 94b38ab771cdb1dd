"""Training loop: the paper's recipe in one readable function, resumable, data-parallel through torchrun.

    bsmamba2 train --config bsmamba2-paper.yaml --data MUSDB18HQ --out runs/paper            # one GPU (or CPU)
    torchrun --nproc-per-node 2 -m bsmamba2 train --config bsmamba2-paper.yaml --data ... --out ...  # DDP
    bsmamba2 train --out runs/paper --resume                                                  # after any crash
    bsmamba2 train --data MYDATA --out runs/ft --init-from bsmamba2-musdb --set train.lr=1e-4  # fine-tune the paper's

Recipe: AdamW (lr 5e-4; constant unless `train.warmup_steps` / `train.decay_steps` shape it), bf16 autocast on GPU,
gradient clipping at 3, gradient accumulation so that batch × processes × accumulation = `train.effective_batch`, an
EMA of the weights (decay 0.999) that is what validation scores and export writes, validation uSDR at every epoch end.
Activation checkpointing (`train.activation_checkpointing: auto`) is chosen before the first step from a measured
footprint: the fastest selection of axis modules to recompute that fits the GPU's free memory, or, with room to spare,
of conv outputs to keep (`bsmamba2.memory`).

Resumability: RUN_DIR/last.pt (and best.pt, by validation uSDR) hold the model, EMA, optimiser, grad scaler, step,
epoch, RNG states and the data position; the training data are a pure function of (seed, sample index) (see
`bsmamba2.data.mixing`), so a run killed with SIGKILL and resumed reaches exactly the weights of an uninterrupted
run (bit-identical on CPU; on GPU up to the non-determinism of its kernels). Checkpoints are written to a temporary
file and renamed, so a kill never leaves a half-written one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.autograd.graph import increment_version
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from bsmamba2.data.mixing import AlignedDataset, StreamSampler, build_datasets
from bsmamba2.data.musdb import load_musdb
from bsmamba2.losses import SeparationLoss
from bsmamba2.memory import auto_checkpointing
from bsmamba2.metrics import usdr
from bsmamba2.build import build_model
from bsmamba2.config import ModelConfig, config_to_dict
from bsmamba2.trainconfig import RunConfig, run_config_from_dict, run_config_to_dict

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------
# Pieces the loop uses


class WaveformModel(nn.Module):
    """Waveform in, stems out, through `forward`, so DistributedDataParallel sees the whole computation."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, wave: torch.Tensor) -> torch.Tensor:  # (b, c, time) -> (b, stems, c, time)
        return self.model.forward_waveform(wave)


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied), kept in float32.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates (as torch_ema does), so that early
    validation scores an average of recent weights rather than of the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = float(decay)
        self.updates = 0
        self.model = copy.deepcopy(model).float().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        ema_params = list(self.model.parameters())
        params = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        # CUDA's multi-tensor kernels do not bump the version counters that `bsmamba2.derived` keys its caches on
        # (the CPU path does): without this, validation and export would score the weights of the first validation.
        for p in ema_params:
            increment_version(p)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


@dataclass
class Dist:
    """This process's place in a torchrun job (world 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, values: list[float]) -> list[float]:
        """Average scalars over processes."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def max(self, values: list[float]) -> list[float]:
        """Element-wise maximum of scalars over processes."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()


def setup_distributed(device: str = "auto") -> Dist:
    """Join the torchrun job described by RANK/WORLD_SIZE/LOCAL_RANK (NCCL on CUDA, gloo on CPU), if any."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    return Dist(rank=rank, local_rank=local_rank, world=world, device=dev)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _atomic_write_text(text: str, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A training checkpoint (last.pt / best.pt), loaded without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training checkpoint {path} not found")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION or "ema" not in ckpt:
        raise ValueError(f"{path} is not a bsmamba2 training checkpoint (last.pt/best.pt of `bsmamba2 train`)")
    return ckpt


def accumulation_steps(effective_batch: int, batch_size: int, world: int) -> int:
    """Micro-batches per optimiser step that keep batch_size × world × accumulation = effective_batch."""
    per_step = batch_size * world
    if effective_batch % per_step:
        raise ValueError(
            f"train.effective_batch={effective_batch} is not a multiple of train.batch_size={batch_size} × "
            f"{world} process(es); change train.batch_size or train.effective_batch"
        )
    return effective_batch // per_step


def _to_device(batch: tuple[torch.Tensor, torch.Tensor], device: torch.device, mono: bool):
    mix, tgt = batch  # (b, c, time), (b, stems, c, time)
    mix, tgt = mix.to(device, non_blocking=True), tgt.to(device, non_blocking=True)
    if mono:
        mix, tgt = mix.mean(1, keepdim=True), tgt.mean(2, keepdim=True)
    return mix, tgt


def make_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """The recipe's AdamW over the model's parameters: on CUDA the fused implementation (one multi-tensor kernel per
    step instead of a chain of foreach passes over the parameters, moments and gradients; the same update rule)."""
    params = list(model.parameters())
    fused = bool(params) and all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay,
                             fused=fused or None)


def learning_rate(tc: TrainConfig, step: int) -> float:
    """The learning rate of optimiser step `step` (0-based): warm-up, then cosine decay (TrainConfig), else lr.

    A function of the step alone, so a resumed run continues the schedule exactly.
    """
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if tc.decay_steps <= 0:
        return tc.lr
    progress = min(1.0, (step - tc.warmup_steps) / tc.decay_steps)
    floor = tc.lr * tc.final_lr_fraction
    return floor + (tc.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_step(
    net: nn.Module,
    model: nn.Module,
    micro_batches,
    accum: int,
    loss_fn: SeparationLoss,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ema: EMA | None,
    autocast: Callable[[], contextlib.AbstractContextManager],
    grad_clip: float,
    distributed: bool = False,
) -> dict[str, float]:
    """One optimiser step: forward/backward over `accum` micro-batches, clip, AdamW, EMA update.

    Args:
        net: what runs the forward pass: `WaveformModel(model)`, possibly wrapped in DDP / torch.compile.
        model: the bare model (its parameters are clipped and averaged into the EMA).
        micro_batches: `accum` pairs (mixture (b, c, time), targets (b, stems, c, time)) on the model's device.
        distributed: `net` is DDP; gradients are then all-reduced on the last micro-batch only.
    Returns:
        mean loss and its parts over the micro-batches, and the gradient norm before clipping.
    """
    sums = torch.zeros(4)  # loss, time, STFT and silence parts; kept on the device: no GPU synchronisation per batch
    for micro, (mix, tgt) in enumerate(micro_batches):
        sync = net.no_sync() if distributed and micro < accum - 1 else contextlib.nullcontext()
        with sync:
            with autocast():
                pred = net(mix)  # (b, stems, c, time)
            loss, parts = loss_fn(pred, tgt, mix)
            scaler.scale(loss / accum).backward()
        step_parts = [loss.detach(), parts["time"], parts["stft"], parts["silence"]]
        sums = sums.to(loss.device) + torch.stack(step_parts) / accum
    sums = sums.tolist()
    scaler.unscale_(optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    if math.isfinite(grad_norm) or scaler.is_enabled():
        scaler.step(optimizer)  # with fp16 the scaler itself skips non-finite steps
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(model)
    return {"loss": sums[0], "time": sums[1], "stft": sums[2], "silence": sums[3], "grad_norm": grad_norm}


@torch.no_grad()
def validate(
    model: nn.Module,
    dataset: AlignedDataset,
    ddp: Dist,
    batch_size: int,
    loss_fn: SeparationLoss,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> dict[str, float]:
    """Mean uSDR (dB, over excerpts and target stems), mean loss and mean silent-region leakage (dB against the
    mixture, over the (excerpt, stem) pairs with silent frames; `losses.SilentLeakageLoss`, NaN when none has) of
    `model` on the validation excerpts.

    Excerpts are split over processes (every world-th one) and the sums are all-reduced.
    """
    model.eval()
    mono = model.audio_channels == 1
    indices = list(range(ddp.rank, len(dataset), ddp.world))
    usdr_sum = loss_sum = leak_sum = 0.0
    count = batches = leak_count = 0
    for first in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[first : first + batch_size]]
        mix = torch.stack([m for m, _ in items]).to(ddp.device)  # (b, c, time)
        tgt = torch.stack([t for _, t in items]).to(ddp.device)  # (b, stems, c, time)
        if mono:
            mix, tgt = mix.mean(1, keepdim=True), tgt.mean(2, keepdim=True)
        with autocast():
            pred = model.forward_waveform(mix)
        pred = pred.float()
        loss, _ = loss_fn(pred, tgt, mix)
        leak, has = loss_fn.silence.per_item(pred, tgt, mix)  # (b, stems)
        leak_sum += float(leak[has].sum())
        leak_count += int(has.sum())
        scores = usdr(pred, tgt)  # (b, stems)
        usdr_sum += float(np.sum(scores))
        count += int(np.size(scores))
        loss_sum += float(loss) * len(items)
        batches += len(items)
    usdr_sum, count, loss_sum, batches, leak_sum, leak_count = ddp.sum(
        [usdr_sum, count, loss_sum, batches, leak_sum, leak_count])
    return {"usdr": usdr_sum / max(count, 1), "loss": loss_sum / max(batches, 1),
            "leakage": leak_sum / leak_count if leak_count else math.nan}


def _choose_checkpointing(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, config: RunConfig,
                          ddp: Dist, autocast: Callable[[], contextlib.AbstractContextManager]) -> None:
    """`train.activation_checkpointing: auto`: set `model.activation_checkpointing` (and `kept_conv_outputs`) to the
    fastest selection of axis modules that fits the GPU (`bsmamba2.memory`), the same on every process; stop with
    what would fit if none."""
    tc = config.train
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    # not yet allocated: AdamW's two moments (created by the first step unless resumed), DDP's gradient buckets
    extra = (0 if optimizer.state else 2 * param_bytes) + (param_bytes if ddp.enabled else 0)
    samples = round(config.data.segment_seconds * config.data.sample_rate)
    decision = auto_checkpointing(model, loss_fn, tc.batch_size, samples, autocast, tc.effective_batch, ddp.world,
                                  extra, tc.memory_margin, agree=ddp.max if ddp.enabled else None)
    if decision.plan is None:
        raise ValueError(decision.message)
    model.activation_checkpointing = decision.plan.selection()
    model.kept_conv_outputs = decision.plan.kept()
    if ddp.main:
        log.info("%s", decision.message)


def _config_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """`key: a-value vs b-value` for every setting that differs between two model config dicts (nested ones dotted)."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} vs {vb!r}")
    return out


def _init_weights(model: nn.Module, config: ModelConfig, spec: str, ddp: Dist, grow_depth: bool = False) -> None:
    """Fine-tuning: load the weights of `spec` (name, path, URL, hf:// id) into the new run's `model`.

    The main process fetches a published model first (one download), then every process loads the same file. The
    weights must fit the run's model exactly; other config differences (say the STFT hop) are logged. With
    `grow_depth` the run's model may have more layers than the checkpoint's: those fill its first layers, and each
    extra layer starts as the identity (`make_identity`), so the grown model computes what the checkpoint did."""
    from bsmamba2 import pretrained  # noqa: PLC0415 - the download machinery only when fine-tuning

    if ddp.main:
        path = pretrained.resolve(spec)
    ddp.barrier()
    if not ddp.main:
        path = pretrained.resolve(spec, progress=False)
    source = pretrained.model_from_file(path)
    differences = _config_differences(config_to_dict(config), config_to_dict(source.config))
    state = source.state_dict()
    new_layers = range(0)
    if grow_depth and config.depth != source.config.depth:
        if config.depth < source.config.depth:
            raise ValueError(f"train.grow_depth: the run's model has {config.depth} layers, fewer than the "
                             f"{source.config.depth} of {spec}; set model.depth to {source.config.depth} or more")
        new_layers = range(source.config.depth, config.depth)
        differences = [d for d in differences if not d.startswith("depth:")]
        # the new layers take the run's seeded weights (their branch outputs zeroed below)
        prefixes = tuple(f"layers.{i}." for i in new_layers)
        state = {**{k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}, **state}
    try:
        model.load_state_dict(state)  # strict: every key, every shape; into the run's dtype and device
    except RuntimeError as err:
        shown = "; ".join(differences[:6]) + (f"; and {len(differences) - 6} more" if len(differences) > 6 else "")
        hint = (" (a deeper run can start from it with --set train.grow_depth=true)"
                if not grow_depth and config.depth > source.config.depth else "")
        raise ValueError(f"train.init_from={spec}: its weights do not fit the run's model (run vs checkpoint: "
                         f"{shown or 'same config, other weights'}){hint}; train with the checkpoint's model "
                         "settings, e.g. --config bsmamba2-paper for bsmamba2-musdb, or --set model.KEY=VALUE") from err
    for index in new_layers:
        model.make_identity(index)
    if differences:
        log.warning("train.init_from=%s: the weights fit, but these model settings differ (run vs checkpoint): %s",
                    spec, "; ".join(differences))
    if ddp.main:
        which = (f"layer {new_layers.start}" if len(new_layers) == 1 else
                 f"layers {new_layers.start}-{new_layers.stop - 1}")
        grown = f"; {which} added as identity (train.grow_depth)" if new_layers else ""
        log.info("initialized the model from %s (%s; %s parameters)%s; the optimizer starts fresh", spec, path,
                 f"{sum(p.numel() for p in model.parameters()):,}", grown)


def _summary_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
    except ImportError:
        log.warning("tensorboard is not installed (pip install 'bsmamba2[train]'); TensorBoard logging is off")
        return None
    return SummaryWriter(str(path))


@dataclass
class TrainResult:
    step: int
    epoch: int
    best_usdr: float
    history: list[dict[str, float]]
    model: nn.Module  # the trained weights
    ema: nn.Module  # their moving average: what validation scores and export writes


# ----------------------------------------------------------------------------------------------------------------
# The loop


def train(
    config: RunConfig,
    out_dir: str | Path,
    resume: bool = False,
    on_step_end: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train `config.model` on `config.data.root` into `out_dir` (last.pt, best.pt, config.yaml, history.json, tb/).

    Args:
        config: the run's settings.
        out_dir: run folder; created if needed.
        resume: continue from out_dir/last.pt (an error if it does not exist).
        on_step_end: called with the step number after every optimiser step (and after its checkpoint).
    Returns:
        TrainResult with the final model and EMA model.
    """
    tc, dc = config.train, config.data
    if dc.root is None:
        raise ValueError("no training data: pass --data ROOT (MUSDB18-HQ layout) or set data.root in the config")
    if tc.precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"train.precision={tc.precision!r}; expected bf16, fp16 or fp32")
    if tc.activation_checkpointing not in (True, False, "auto"):
        raise ValueError(f"train.activation_checkpointing={tc.activation_checkpointing!r}; "
                         "expected auto, true or false")
    if tc.warmup_steps < 0 or tc.decay_steps < 0 or not 0.0 <= tc.final_lr_fraction <= 1.0:
        raise ValueError(f"train.warmup_steps ({tc.warmup_steps}) and train.decay_steps ({tc.decay_steps}) must be "
                         f">= 0 and train.final_lr_fraction ({tc.final_lr_fraction}) within 0..1, e.g. 0.05")
    if tc.init_from is not None and not isinstance(tc.init_from, str):
        raise ValueError(f"train.init_from={tc.init_from!r}; expected a model name, checkpoint path, URL or hf:// id "
                         "(quote it in YAML)")
    if tc.grow_depth and tc.init_from is None and not resume:  # a resumed run takes its weights from last.pt
        raise ValueError("train.grow_depth=true needs train.init_from: the checkpoint whose layers the run starts from")
    if not 0.0 <= tc.memory_margin < 1.0:
        raise ValueError(f"train.memory_margin={tc.memory_margin}; expected a fraction in [0, 1), e.g. 0.1")
    if dc.sample_rate != config.model.stft.sample_rate:
        raise ValueError(f"data.sample_rate={dc.sample_rate} but the model works at {config.model.stft.sample_rate} Hz; "
                         "resample the dataset or change one of them")
    out = Path(out_dir)
    split = load_musdb(dc.root, dc.stems, dc.valid_tracks, dc.sample_rate)  # before writing anything: fail early
    ddp = setup_distributed(tc.device)
    cuda = ddp.device.type == "cuda"
    if ddp.main:
        out.mkdir(parents=True, exist_ok=True)
    ddp.barrier()

    # ---- model, EMA, optimiser, scaler; identical initial weights on every process (same seed)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed % 2**32)
    random.seed(tc.seed)
    if cuda:
        torch.set_float32_matmul_precision("high")
    model = build_model(config.model).to(ddp.device)
    if tc.init_from is not None and not resume:  # before the EMA, which starts as a copy of these weights
        _init_weights(model, config.model, tc.init_from, ddp, tc.grow_depth)
    model.activation_checkpointing = tc.activation_checkpointing is True  # auto: decided before the first step
    ema = EMA(model, tc.ema_decay)
    optimizer = make_optimizer(model, tc)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[tc.precision] if cuda else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)

    def autocast() -> contextlib.AbstractContextManager:
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=amp_dtype)

    accum = accumulation_steps(tc.effective_batch, tc.batch_size, ddp.world)
    steps_per_epoch = max(1, tc.epoch_samples // tc.effective_batch)
    total_steps = tc.max_steps if tc.max_steps is not None else tc.epochs * steps_per_epoch

    step, best_usdr, history, clock = 0, -math.inf, [], 0.0  # clock: training seconds before this process
    last_path, best_path = out / "last.pt", out / "best.pt"
    if resume:
        ckpt = load_checkpoint(last_path)  # on CPU: RNG states must stay there; load_state_dict moves the rest
        differences = _config_differences(ckpt["config"]["model"], run_config_to_dict(config)["model"])
        if differences:
            raise ValueError(f"{last_path} was trained with a different model config ({'; '.join(differences)}, "
                             "checkpoint vs now); resume with its config.yaml")
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step, best_usdr, history = int(ckpt["step"]), float(ckpt["best_usdr"]), list(ckpt["history"])
        clock = float(ckpt.get("train_seconds", 0.0))
        rng = ckpt["rng"]
        if len(rng) == ddp.world:
            _set_rng_state(rng[ddp.rank])
        else:  # world size changed: RNG streams cannot continue; derive fresh ones from the step
            torch.manual_seed(tc.seed + 1_000_003 * step + ddp.rank)
        if ckpt["effective_batch"] != tc.effective_batch:
            log.warning("effective batch changed from %d to %d on resume", ckpt["effective_batch"], tc.effective_batch)
        del ckpt
        if ddp.main:
            log.info("resumed from %s at step %d (epoch %d)", last_path, step, step // steps_per_epoch)
    if ddp.main:
        _atomic_write_text(yaml.safe_dump(run_config_to_dict(config), sort_keys=False), out / "config.yaml")
    loss_fn = SeparationLoss(tc.time_weight, tc.stft_windows, tc.stft_hop, tc.stft_min_nfft, tc.silence_weight,
                             tc.silence_floor_db, config.data.sample_rate).to(ddp.device)
    if tc.activation_checkpointing == "auto":
        _choose_checkpointing(model, optimizer, loss_fn, config, ddp, autocast)

    net: nn.Module = WaveformModel(model)
    if tc.compile:
        net = torch.compile(net)
    if ddp.enabled:
        net = DistributedDataParallel(net, device_ids=[ddp.local_rank] if cuda else None)

    # ---- data: rank 0 detects source activity (cached), the others then read the cache
    if ddp.main:
        build_datasets(split, dc, model.stems, 2, tc.seed, workers=dc.num_workers)
    ddp.barrier()
    train_set, valid_set = build_datasets(split, dc, model.stems, 2, tc.seed)
    sampler = StreamSampler(tc.batch_size, ddp.world, ddp.rank, accum, start_step=step)
    loader = DataLoader(
        train_set,
        batch_size=tc.batch_size,
        sampler=sampler,
        num_workers=dc.num_workers,
        pin_memory=cuda,
        persistent_workers=dc.num_workers > 0,
        prefetch_factor=4 if dc.num_workers > 0 else None,
        drop_last=True,
    )
    batches = iter(loader)
    mono = model.audio_channels == 1

    writer = _summary_writer(out / "tb") if ddp.main else None
    if ddp.main:
        log.info(
            "training %s (%.2fM parameters) on %s × %d: batch %d × accumulation %d = %d, %d steps/epoch, %d steps",
            type(model).__name__, sum(p.numel() for p in model.parameters()) / 1e6, ddp.device, ddp.world,
            tc.batch_size, accum, tc.effective_batch, steps_per_epoch, total_steps,
        )
    # Into a log file (a batch job's stderr) the bar is redrawn every 30 s, not every 0.1 s: the validation lines
    # stay readable and the log small.
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not ddp.main, dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 30.0)

    def save(path: Path) -> None:
        rng = [_rng_state()]
        if ddp.enabled:
            rng = [None] * ddp.world
            dist.all_gather_object(rng, _rng_state())
        if not ddp.main:
            return
        state = {
            "version": CHECKPOINT_VERSION,
            "config": run_config_to_dict(config),
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "step": step,
            "epoch": step // steps_per_epoch,
            "samples_seen": step * tc.effective_batch,  # data position: the stream resumes at this sample
            "effective_batch": tc.effective_batch,
            "accumulation": accum,
            "best_usdr": best_usdr,
            "history": history,
            "train_seconds": clock + time.perf_counter() - started,
            "rng": rng,
            "world_size": ddp.world,
        }
        _atomic_torch_save(state, path)

    parts = ("loss", "time", "stft", "silence", "grad_norm")
    window = {**dict.fromkeys(parts, 0.0), "n": 0, "t0": time.perf_counter()}
    started = time.perf_counter()
    epoch_loss = [0.0, 0]
    while step < total_steps:
        # ---- one optimiser step over `accum` micro-batches
        model.train()
        micro_batches = (_to_device(next(batches), ddp.device, mono) for _ in range(accum))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(tc, step)
        stats = train_step(net, model, micro_batches, accum, loss_fn, optimizer, scaler, ema, autocast, tc.grad_clip,
                           ddp.enabled)
        step += 1
        step_loss, grad_norm = stats["loss"], stats["grad_norm"]
        epoch_loss = [epoch_loss[0] + step_loss, epoch_loss[1] + 1]
        if not math.isfinite(grad_norm) and not scaler.is_enabled():
            log.warning("step %d: non-finite gradient norm, update skipped", step)

        # ---- logging
        for key in ("loss", "time", "stft", "silence"):
            window[key] += stats[key]
        window["grad_norm"] += grad_norm if math.isfinite(grad_norm) else 0.0
        window["n"] += 1
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", epoch=step // steps_per_epoch, refresh=False)
        if step % tc.log_every_steps == 0 or step == total_steps:
            n = window["n"]
            loss_m, time_m, stft_m, silence_m, gn_m = ddp.mean([window[k] / n for k in parts])
            elapsed = time.perf_counter() - window["t0"]
            if writer is not None:
                writer.add_scalar("train/loss", loss_m, step)
                writer.add_scalar("train/loss_time", time_m, step)
                writer.add_scalar("train/loss_stft", stft_m, step)
                if tc.silence_weight:
                    writer.add_scalar("train/silence_db", silence_m, step)
                writer.add_scalar("train/grad_norm", gn_m, step)
                writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
                writer.add_scalar("train/steps_per_s", n / max(elapsed, 1e-9), step)
            window = {**dict.fromkeys(parts, 0.0), "n": 0, "t0": time.perf_counter()}

        # ---- epoch end: validate the EMA weights, keep the best
        epoch_end = step % steps_per_epoch == 0
        epoch = step // steps_per_epoch
        if epoch_end and valid_set is not None and len(valid_set) and epoch % tc.valid_every_epochs == 0:
            scores = validate(ema.model, valid_set, ddp, tc.valid_batch_size, loss_fn, autocast)
            is_best = scores["usdr"] > best_usdr
            best_usdr = max(best_usdr, scores["usdr"])
            train_loss = ddp.mean([epoch_loss[0] / max(epoch_loss[1], 1)])[0]
            history.append({"step": step, "epoch": epoch, "val_usdr": scores["usdr"], "val_loss": scores["loss"],
                            "val_leakage_db": None if math.isnan(scores["leakage"]) else scores["leakage"],
                            "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"],
                            "minutes": (clock + time.perf_counter() - started) / 60.0})
            if ddp.main:
                log.info("epoch %d step %d: val uSDR %.3f dB (best %.3f), val loss %.4f, silent-region leakage %.1f dB",
                         epoch, step, scores["usdr"], best_usdr, scores["loss"], scores["leakage"])
                if writer is not None:
                    writer.add_scalar("val/usdr", scores["usdr"], step)
                    writer.add_scalar("val/loss", scores["loss"], step)
                    writer.add_scalar("val/leakage_db", scores["leakage"], step)
                    writer.flush()
                _atomic_write_text(json.dumps(history, indent=1), out / "history.json")
            save(last_path)
            if is_best:
                save(best_path)
            saved = True
        elif epoch_end or step == total_steps or (tc.save_every_steps and step % tc.save_every_steps == 0):
            save(last_path)
            saved = True
        else:
            saved = False
        if epoch_end:
            epoch_loss = [0.0, 0]
        if on_step_end is not None:
            on_step_end(step)
        if tc.time_limit_minutes is not None:
            # rank 0's clock decides for everyone, so all processes stop after the same step
            over = float(time.perf_counter() - started > 60.0 * tc.time_limit_minutes)
            if ddp.mean([over if ddp.main else 0.0])[0] > 0:
                if not saved:
                    save(last_path)
                if ddp.main:
                    log.info("time limit of %g min reached at step %d; continue with --resume",
                             tc.time_limit_minutes, step)
                break

    bar.close()
    if writer is not None:
        writer.close()
    ddp.barrier()
    return TrainResult(step, step // steps_per_epoch, best_usdr, history, model, ema.model)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
