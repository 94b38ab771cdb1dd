"""Activation checkpointing that fits the device: measure a training step's memory, take the fastest plan that fits.

`train.activation_checkpointing: auto` runs `auto_checkpointing` once before the first step:

1. `measure_footprint`: a warm-up and three dry-run steps (forward, loss, backward; no optimiser step) at the real
   shapes, reading the peak memory: every axis module checkpointed; then layer 0's time-axis module not; then its
   band-axis module not. This gives `Footprint`, a cost model: peak = fixed + (full + Σ extra of each module kept
   un-checkpointed), the part in parentheses proportional to the batch. For a model whose axis modules can also
   keep their conv output for backward instead of recomputing it (BSMamba2 on the fast path:
   `BandSplitModel.kept_conv_outputs`), two more dry runs measure what that adds per time-axis / band-axis module:
   the plans faster than no checkpointing at all.
2. `memory_budget`: what this process may allocate: free device memory plus what its allocator already holds,
   capped by `torch.cuda.set_per_process_memory_fraction`, divided by the fragmentation measured in the dry runs
   (the caching allocator's reserved / allocated bytes at the peak; at least 1 + margin), less a fixed reserve. The
   fragmentation is measured without memory pressure, where the allocator keeps what it has cached; near a cap it
   frees that cache and retries, so the measured ratio already errs on the safe side and the margin is not added
   on top of it.
3. `choose_plan` (pure): the first of `plans_by_speed` whose predicted peak fits the budget. When none does (not even
   with every module checkpointed), `batch_advice` says which batch size and accumulation would fit.

Why the sum is safe: layer 0's modules are the first in the forward pass and the last in the backward pass, so the
activations they keep are alive at every moment of the step, on top of the peak with full checkpointing (at the
start of the backward pass, when all checkpoint inputs are alive and the last module is recomputed). A plan keeps
the first layers' activations and checkpoints the last layers', which are measured the same way; when the last
module is not recomputed either, the true peak is lower than the sum. A kept conv output lives from its module's
forward to its backward as well, so it adds in the same way.

Letters as elsewhere; a plan's "time"/"band" counts are how many of the `depth` time-axis / band-axis modules are
checkpointed (always the last ones); its "keep" count, with nothing checkpointed, how many keep their conv output
(the first ones, in the order the forward pass runs them: layer 0's time-axis module, its band-axis module, ...).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

GiB = 2.0**30
MARGIN = 0.05  # the least allowance for fragmentation, a fraction of the peak (train.memory_margin)
RESERVE_BYTES = 0.5 * GiB  # and a fixed reserve for the CUDA libraries' workspaces (cuBLAS, cuFFT) on top


@dataclass(frozen=True)
class CheckpointPlan:
    """Which axis modules recompute their activations in backward: the last `time` time-axis modules and the last
    `band` band-axis modules of a `depth`-layer model. With none recomputed, the first `keep` axis modules (in
    forward order) also keep their conv output instead of recomputing it in backward (faster still)."""

    depth: int
    time: int
    band: int
    keep: int = 0

    def __post_init__(self):
        if self.keep and (self.checkpointed or self.keep > 2 * self.depth):
            raise ValueError(f"a plan keeps conv outputs only with nothing checkpointed, in at most {2 * self.depth} "
                             f"modules: {self}")

    @classmethod
    def none(cls, depth: int) -> "CheckpointPlan":
        return cls(depth, 0, 0)

    @classmethod
    def full(cls, depth: int) -> "CheckpointPlan":
        return cls(depth, depth, depth)

    @property
    def checkpointed(self) -> int:
        """Modules recomputed in backward (each costs one more forward pass of that module)."""
        return self.time + self.band

    def selection(self) -> bool | frozenset[tuple[int, int]]:
        """The value for `BandSplitModel.activation_checkpointing`: True, False or a set of (layer, axis) pairs."""
        if self.checkpointed == 0:
            return False
        if self.checkpointed == 2 * self.depth:
            return True
        return frozenset([(i, 0) for i in range(self.depth - self.time, self.depth)]
                         + [(i, 1) for i in range(self.depth - self.band, self.depth)])

    def kept(self) -> frozenset[tuple[int, int]]:
        """The value for `BandSplitModel.kept_conv_outputs`: the (layer, axis) pairs that keep their conv output."""
        return frozenset(divmod(i, 2) for i in range(self.keep))

    def describe(self) -> str:
        if self.keep:
            where = "all" if self.keep == 2 * self.depth else f"the first {self.keep} of"
            return f"none, and the conv outputs kept in {where} {2 * self.depth} axis modules"
        if self.checkpointed == 0:
            return "none"
        if self.checkpointed == 2 * self.depth:
            return f"all {2 * self.depth} axis modules"

        def layers(n: int) -> str:
            first, last = self.depth - n, self.depth - 1
            return f"layer {last}" if n == 1 else f"layers {first}-{last}"

        parts = [f"{axis}-axis modules of {layers(n)}" for axis, n in (("time", self.time), ("band", self.band)) if n]
        return f"{' and '.join(parts)} ({self.checkpointed} of {2 * self.depth})"


@dataclass(frozen=True)
class Footprint:
    """Peak memory of one training step, measured at `batch`: `fixed` + `full` with every axis module checkpointed,
    plus `per_module` = (time-axis, band-axis) for each module that keeps its activations instead. Bytes;
    `per_module` is inf where the measurement itself did not fit (no plan then keeps such a module); `conv_output`
    = (time-axis, band-axis), what a module not checkpointed adds when it also keeps its conv output (inf: the model
    cannot, or the measurement did not fit)."""

    depth: int
    batch: int
    fixed: float  # independent of the batch: weights, EMA, optimiser state, gradients
    full: float
    per_module: tuple[float, float]
    conv_output: tuple[float, float] = (math.inf, math.inf)

    def peak(self, plan: CheckpointPlan, batch: int | None = None) -> float:
        """Predicted peak bytes of a step with `plan` at `batch` (default: the measured one)."""
        kept_t, kept_b = plan.depth - plan.time, plan.depth - plan.band
        conv_t, conv_b = (plan.keep + 1) // 2, plan.keep // 2  # the first `keep` modules: time, band, time, ...
        terms = ((kept_t, self.per_module[0]), (kept_b, self.per_module[1]), (conv_t, self.conv_output[0]),
                 (conv_b, self.conv_output[1]))
        extra = sum(n * a for n, a in terms if n)
        return self.fixed + (self.full + extra) * (batch or self.batch) / self.batch


def plans_by_speed(footprint: Footprint) -> list[CheckpointPlan]:
    """Every plan, fastest first: by the number of checkpointed modules (each costs one more forward of a module;
    the time-axis and band-axis modules run the same projections on the same tokens, so they count alike), then by
    the number keeping their conv output (each saves that output's recomputation), then by predicted peak (among
    equally fast plans the one with more room). Plans that keep conv outputs come only where the model can."""
    d = footprint.depth
    plans = [CheckpointPlan(d, t, b) for t in range(d + 1) for b in range(d + 1)]
    if all(math.isfinite(a) for a in footprint.conv_output):
        plans += [CheckpointPlan(d, 0, 0, k) for k in range(1, 2 * d + 1)]
    return sorted(plans, key=lambda p: (p.checkpointed, -p.keep, footprint.peak(p)))


def choose_plan(budget: float, footprint: Footprint, candidates: list[CheckpointPlan]) -> CheckpointPlan | None:
    """The first of `candidates` (ordered fastest first) whose predicted peak fits in `budget` bytes; None if none."""
    for plan in candidates:
        if footprint.peak(plan) <= budget:
            return plan
    return None


def batch_advice(budget: float, footprint: Footprint, batch_size: int, effective_batch: int, world: int = 1) -> str:
    """One line for a batch that does not fit even with full checkpointing: the largest batch size below it that
    does (with the accumulation that keeps `effective_batch` over `world` processes), or what else to change."""
    full = CheckpointPlan.full(footprint.depth)
    need = footprint.peak(full, batch_size)
    head = (f"train.batch_size={batch_size} does not fit: a training step needs {need / GiB:.1f} GiB even with full "
            f"activation checkpointing, {budget / GiB:.1f} GiB are available")
    if need <= budget:  # extrapolated from batch 1, after the dry run at batch_size ran out of memory
        head = (f"train.batch_size={batch_size} does not fit: a training step ran out of memory even with full "
                f"activation checkpointing, {budget / GiB:.1f} GiB are available")
    per_process = effective_batch // world
    for b in range(min(batch_size - 1, per_process), 0, -1):
        if per_process % b == 0 and footprint.peak(full, b) <= budget:
            accum = per_process // b
            return (f"{head}; use --set train.batch_size={b} (predicted peak {footprint.peak(full, b) / GiB:.1f} GiB; "
                    f"accumulation {accum} keeps the effective batch {effective_batch})")
    return (f"{head}, nor does batch 1 ({footprint.peak(full, 1) / GiB:.1f} GiB); shorten data.segment_seconds or "
            "train on a GPU with more memory")


# ----------------------------------------------------------------------------------------------------------------
# Measuring on the device


class CudaPeak:
    """Memory probe of a CUDA device: the peak bytes allocated while a function runs, above what was allocated
    before it (`__call__`); what is allocated now (`allocated`); give cached blocks back (`release`).
    `fragmentation`: the largest ratio of peak reserved to peak allocated bytes seen (>= 1), what the caching
    allocator holds beyond what the step uses at its peak."""

    def __init__(self, device: torch.device):
        self.device = device
        self.fragmentation = 1.0

    def __call__(self, step: Callable[[], None]) -> float:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        step()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        self.fragmentation = max(self.fragmentation, torch.cuda.max_memory_reserved(self.device) / max(peak, 1))
        return float(peak - base)

    def allocated(self) -> float:
        return float(torch.cuda.memory_allocated(self.device))

    def release(self) -> None:
        torch.cuda.empty_cache()


def measure_footprint(
    model: nn.Module,
    loss_fn: nn.Module,
    batch: int,
    samples: int,
    autocast: Callable[[], contextlib.AbstractContextManager],
    probe,
    extra_fixed: float = 0.0,
) -> Footprint:
    """Dry-run training steps of `model` (a `BandSplitModel`) at `batch` × `samples` random samples and read their
    peak memory with `probe` (`CudaPeak`): a warm-up (kernel autotuning, library workspaces that then stay), then
    every axis module checkpointed, then layer 0's time-axis module kept, then its band-axis module kept; where the
    model's modules can keep their conv output, each of those two again with it kept. The model's weights, its
    checkpointing and conv-output settings and training mode, its gradients (cleared) and the random number
    generators are as before.

    Args:
        loss_fn: the training loss, called as `loss_fn(prediction, targets, mixture)` -> (loss, parts), outside
            `autocast`.
        probe: `probe(step)` runs `step` and returns the peak bytes it allocated (it may raise
            torch.cuda.OutOfMemoryError); `probe.allocated()`, bytes allocated now; `probe.release()`, called after
            each dry run.
        extra_fixed: bytes the real step needs beyond what is allocated now and what the step allocates itself
            (AdamW's moments before the first step, DDP's gradient buckets).
    Returns:
        The footprint at `batch`; when even full checkpointing runs out of memory there, the footprint at batch 1
        (`per_module` inf) for `batch_advice`. `conv_output` is inf where a kept conv output adds nothing (the model
        cannot keep it, or does not on this device's path) or its dry run ran out of memory.
    """
    device = next(model.parameters()).device
    depth, channels, stems = len(model.layers), model.audio_channels, len(model.stems)
    saved, saved_kept, was_training = model.activation_checkpointing, model.kept_conv_outputs, model.training
    every = frozenset((i, axis) for i in range(depth) for axis in (0, 1))

    def dry_run(selection, b: int, kept: frozenset = frozenset()) -> float:
        """Peak bytes of one forward + backward at batch b, inf when it runs out of memory."""
        model.activation_checkpointing = selection
        model.kept_conv_outputs = kept
        gen = torch.Generator(device=device).manual_seed(0)

        def step() -> None:
            mix = 0.1 * torch.randn(b, channels, samples, device=device, generator=gen)  # (b, c, time)
            tgt = 0.05 * torch.randn(b, stems, channels, samples, device=device, generator=gen)  # (b, n, c, time)
            with autocast():
                pred = model.forward_waveform(mix)  # (b, n, c, time)
            loss, _ = loss_fn(pred, tgt, mix)
            loss.backward()

        oom = False
        try:
            peak = probe(step)
        except RuntimeError as err:
            if not isinstance(err, torch.cuda.OutOfMemoryError):
                raise
            oom = True  # freed below, after the handler has dropped the traceback that holds the step's tensors
        model.zero_grad(set_to_none=True)
        probe.release()
        return math.inf if oom else peak

    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            model.train()
            b = batch if math.isfinite(dry_run(True, batch)) else 1  # the warm-up; batch 1 for the advice
            fixed = probe.allocated() + extra_fixed
            full = dry_run(True, b)
            if b != batch or math.isinf(full):
                if math.isinf(full) and devices:  # batch 1 needs more than the device has: a lower bound
                    full = float(torch.cuda.get_device_properties(device).total_memory)
                return Footprint(depth, b, fixed, full, (math.inf, math.inf))
            keep_time = dry_run(every - {(0, 0)}, batch)
            keep_band = dry_run(every - {(0, 1)}, batch)
            conv_output = (math.inf, math.inf)
            if model.can_keep_conv_outputs and math.isfinite(keep_time) and math.isfinite(keep_band):
                conv_output = tuple(dry_run(every - {m}, batch, frozenset([m])) - base for m, base in
                                    (((0, 0), keep_time), ((0, 1), keep_band)))
                conv_output = tuple(a if a > 0 else math.inf for a in conv_output)  # nothing kept: not offered
    finally:
        model.activation_checkpointing, model.kept_conv_outputs = saved, saved_kept
        model.train(was_training)
    return Footprint(depth, batch, fixed, full, (max(0.0, keep_time - full), max(0.0, keep_band - full)),
                     conv_output)


def memory_budget(device: torch.device, margin: float = MARGIN, fragmentation: float = 1.0,
                  reserve: float = RESERVE_BYTES) -> tuple[float, float]:
    """(budget, usable) bytes for this process's peak allocation on a CUDA device: usable = free + what this process
    already holds (its allocator's cache included), capped by `set_per_process_memory_fraction`; budget = usable
    divided by the measured `fragmentation` (reserved / allocated at the peak) or by 1 + `margin` when that is
    larger, less `reserve`."""
    free, total = torch.cuda.mem_get_info(device)
    usable = free + torch.cuda.memory_reserved(device)
    fraction = torch.cuda.get_per_process_memory_fraction(device)
    if fraction < 1.0:
        usable = min(usable, fraction * total)
    return usable / max(fragmentation, 1.0 + margin) - reserve, float(usable)


@dataclass(frozen=True)
class Decision:
    """What `auto_checkpointing` chose: `plan` (None: the batch does not fit; `message` says what would)."""

    plan: CheckpointPlan | None
    predicted_peak: float
    budget: float
    footprint: Footprint | None
    message: str


def decide(budget: float, footprint: Footprint, batch_size: int, effective_batch: int, world: int = 1,
           budget_note: str = "") -> Decision:
    """The plan for `footprint` within `budget` and a one-line log or error message (pure); `budget_note` says
    where the budget comes from."""
    plan = choose_plan(budget, footprint, plans_by_speed(footprint))
    if plan is None or footprint.batch != batch_size:
        return Decision(None, math.inf, budget, footprint,
                        batch_advice(budget, footprint, batch_size, effective_batch, world))
    a_t, a_b = (f"{a / GiB:.2f}" if math.isfinite(a) else "over budget" for a in footprint.per_module)
    conv = ""
    if all(math.isfinite(a) for a in footprint.conv_output):
        conv = ", +{:.2f} / +{:.2f} GiB per conv output kept".format(*(a / GiB for a in footprint.conv_output))
    message = (f"activation checkpointing (auto): {plan.describe()}; predicted peak "
               f"{footprint.peak(plan) / GiB:.1f} GiB of a {budget / GiB:.1f} GiB budget{budget_note} (measured "
               f"{footprint.peak(CheckpointPlan.full(footprint.depth)) / GiB:.1f} GiB with all checkpointed, "
               f"+{a_t} / +{a_b} GiB per time-axis / band-axis module kept{conv})")
    return Decision(plan, footprint.peak(plan), budget, footprint, message)


def agree_over_processes(footprint: Footprint, budget: float, batch_size: int,
                         agree: Callable[[list[float]], list[float]]) -> tuple[Footprint, float]:
    """The largest footprint (per sample, each term) and the smallest budget over processes, through `agree`
    (element-wise maximum over processes), so that every process makes the same choice. A process whose dry run at
    `batch_size` ran out of memory (measured at batch 1) makes every process take that footprint at batch 1."""
    fp = footprint
    per_sample = [a / fp.batch for a in (fp.full, *fp.per_module, *fp.conv_output)]
    neg_budget, fixed, full, a_t, a_b, c_t, c_b, short = agree([-budget, fp.fixed, *per_sample,
                                                                float(fp.batch != batch_size)])
    b = 1 if short else batch_size
    return Footprint(fp.depth, b, fixed, full * b, (a_t * b, a_b * b), (c_t * b, c_b * b)), -neg_budget


def auto_checkpointing(
    model: nn.Module,
    loss_fn: nn.Module,
    batch_size: int,
    samples: int,
    autocast: Callable[[], contextlib.AbstractContextManager],
    effective_batch: int,
    world: int = 1,
    extra_fixed: float = 0.0,
    margin: float = MARGIN,
    agree: Callable[[list[float]], list[float]] | None = None,
) -> Decision:
    """Choose `model.activation_checkpointing` for training at `batch_size` × `samples` on the model's device.

    On CPU: no checkpointing (there is no peak-memory probe there to size it by; the log line says how to turn it
    on). On CUDA: `measure_footprint`, `memory_budget`, `decide`. The caller sets
    `model.activation_checkpointing = decision.plan.selection()` or raises `ValueError(decision.message)` when
    `plan` is None.

    Args:
        extra_fixed: bytes the step will need beyond what is allocated now and what it allocates itself (AdamW's two
            moments before the first step, DDP's gradient buckets).
        agree: with several processes, element-wise maximum over processes (`Dist.max`); every rank then decides
            on the largest footprint and the smallest budget, and so makes the same choice.
    """
    device = next(model.parameters()).device
    depth = len(model.layers)
    if device.type != "cuda":
        plan = CheckpointPlan.none(depth)
        return Decision(plan, math.nan, math.inf, None,
                        f"activation checkpointing (auto): none on {device.type} (no memory probe there; if the "
                        "run runs out of RAM, set train.activation_checkpointing=true or lower train.batch_size)")
    probe = CudaPeak(device)
    probe.release()
    footprint = measure_footprint(model, loss_fn, batch_size, samples, autocast, probe, extra_fixed)
    budget, usable = memory_budget(device, margin, probe.fragmentation)
    if agree is not None:
        footprint, budget = agree_over_processes(footprint, budget, batch_size, agree)
    note = (f" ({usable / GiB:.1f} GiB usable, fragmentation {probe.fragmentation:.3f}, at least {1 + margin:g}; "
            f"{RESERVE_BYTES / GiB:g} GiB reserve)")
    return decide(budget, footprint, batch_size, effective_batch, world, note if agree is None else " (all ranks)")
