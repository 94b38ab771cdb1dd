"""Activation checkpointing that fits the device: the pure policy (plans, choice, batch advice), partial checkpointing
(same gradients as none), and the dry-run measurement on CPU with a probe that counts the bytes saved for backward."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from bsmamba2.config import BSMamba2Config, RoFormerConfig
from bsmamba2.losses import SeparationLoss
from bsmamba2.memory import (GiB, CheckpointPlan, Footprint, agree_over_processes, auto_checkpointing, batch_advice,
                             choose_plan, decide, measure_footprint, memory_budget, plans_by_speed)
from bsmamba2.build import build_model
from conftest import SavedBytes

# The paper's BSMamba2 at batch 5 on a GPU, roughly: 20 GiB with all 12 axis modules checkpointed, ~4.6 GiB more for
# each one that keeps its activations (75 GiB with none checkpointed); band-axis modules slightly larger here.
PAPER = Footprint(depth=6, batch=5, fixed=0.6 * GiB, full=19.6 * GiB, per_module=(4.5 * GiB, 4.7 * GiB))


# ---------------------------------------------------------------- plans and the cost model


def test_plan_selection_and_description():
    assert CheckpointPlan.none(6).selection() is False and CheckpointPlan.none(6).describe() == "none"
    assert CheckpointPlan.full(6).selection() is True and CheckpointPlan.full(6).describe() == "all 12 axis modules"
    plan = CheckpointPlan(6, time=1, band=3)  # the last layers' modules are the checkpointed ones
    assert plan.selection() == {(5, 0), (3, 1), (4, 1), (5, 1)}
    assert plan.describe() == "time-axis modules of layer 5 and band-axis modules of layers 3-5 (4 of 12)"


def test_footprint_is_additive_and_scales_with_the_batch():
    assert PAPER.peak(CheckpointPlan.full(6)) == pytest.approx(20.2 * GiB)
    assert PAPER.peak(CheckpointPlan.none(6)) == pytest.approx((20.2 + 6 * 4.5 + 6 * 4.7) * GiB)
    assert PAPER.peak(CheckpointPlan(6, 4, 6)) == pytest.approx((20.2 + 2 * 4.5) * GiB)
    assert PAPER.peak(CheckpointPlan.full(6), batch=1) == pytest.approx((0.6 + 19.6 / 5) * GiB)
    # a module whose measurement ran out of memory is never kept, but plans that checkpoint it stay finite
    half = Footprint(6, 5, 0.0, 1.0, (math.inf, 1.0))
    assert math.isinf(half.peak(CheckpointPlan(6, 5, 6))) and half.peak(CheckpointPlan(6, 6, 0)) == 7.0


def test_plans_are_ordered_fastest_first():
    plans = plans_by_speed(PAPER)
    assert len(plans) == 49 and plans[0] == CheckpointPlan.none(6) and plans[-1] == CheckpointPlan.full(6)
    assert [p.checkpointed for p in plans] == sorted(p.checkpointed for p in plans)
    # one module checkpointed: the band-axis one (larger) frees more, so it comes first
    assert plans[1] == CheckpointPlan(6, 0, 1) and plans[2] == CheckpointPlan(6, 1, 0)


# The same with the conv outputs keepable: 1.27 GiB per axis module (2 · c = 2560 bf16 values per token at batch 5).
KEEPING = Footprint(depth=6, batch=5, fixed=0.6 * GiB, full=19.6 * GiB, per_module=(4.5 * GiB, 4.7 * GiB),
                    conv_output=(1.27 * GiB, 1.27 * GiB))


def test_plans_keeping_conv_outputs():
    plan = CheckpointPlan(6, 0, 0, keep=3)  # the first three axis modules in forward order
    assert plan.kept() == {(0, 0), (0, 1), (1, 0)} and plan.selection() is False
    assert plan.describe() == "none, and the conv outputs kept in the first 3 of 12 axis modules"
    assert CheckpointPlan(6, 0, 0, 12).describe() == "none, and the conv outputs kept in all 12 axis modules"
    assert CheckpointPlan.none(6).kept() == frozenset() == CheckpointPlan.full(6).kept()
    for bad in (dict(time=1, band=0, keep=2), dict(time=0, band=0, keep=13)):
        with pytest.raises(ValueError, match="keeps conv outputs only with nothing checkpointed"):
            CheckpointPlan(6, **bad)
    none = KEEPING.peak(CheckpointPlan.none(6))
    assert KEEPING.peak(plan) == pytest.approx(none + 3 * 1.27 * GiB)
    assert KEEPING.peak(CheckpointPlan(6, 0, 0, 12), batch=1) == pytest.approx(0.6 * GiB + (none - 0.6 * GiB
                                                                                           + 12 * 1.27 * GiB) / 5)
    # fastest first: all twelve kept, then fewer, then none, then the checkpointing plans as before
    plans = plans_by_speed(KEEPING)
    assert [p.keep for p in plans[:13]] == list(range(12, -1, -1)) and len(plans) == 49 + 12
    assert plans[13:] == plans_by_speed(PAPER)[1:]
    assert all(p.keep == 0 for p in plans_by_speed(PAPER))  # a model that cannot keep them gets no such plan


@pytest.mark.parametrize("budget_gib, keep", [(200.0, 12), (75.4 + 12 * 1.27 + 0.01, 12), (75.4 + 5.1, 4),
                                              (75.45, 0)])
def test_choose_plan_keeps_conv_outputs_where_they_fit(budget_gib, keep):
    plan = choose_plan(budget_gib * GiB, KEEPING, plans_by_speed(KEEPING))
    assert plan == CheckpointPlan(6, 0, 0, keep)
    d = decide(budget_gib * GiB, KEEPING, batch_size=5, effective_batch=60)
    assert d.plan == plan and d.message.endswith("module kept, +1.27 / +1.27 GiB per conv output kept)")


@pytest.mark.parametrize("budget_gib, expected", [
    (200.0, CheckpointPlan(6, 0, 0)),  # everything fits: no recomputation
    (75.45, CheckpointPlan(6, 0, 0)),  # just the none peak (75.4 GiB)
    (71.0, CheckpointPlan(6, 0, 1)),  # one band-axis module (4.7 GiB) is enough
    (62.0, CheckpointPlan(6, 0, 3)),  # 75.4 - 62 = 13.4 GiB: three modules; band-axis ones leave the most room
    (60.0, CheckpointPlan(6, 0, 4)),  # 15.4 GiB: three modules free at most 14.1, so four
    (45.0, CheckpointPlan(6, 1, 6)),  # 30.4 GiB: seven modules, all six band-axis ones and one time-axis
    (20.25, CheckpointPlan(6, 6, 6)),  # only full checkpointing (20.2 GiB)
    (20.0, None),  # nothing fits
])
def test_choose_plan_picks_the_fastest_that_fits(budget_gib, expected):
    assert choose_plan(budget_gib * GiB, PAPER, plans_by_speed(PAPER)) == expected


def test_decide_logs_the_choice_and_its_predicted_peak():
    d = decide(62.0 * GiB, PAPER, batch_size=5, effective_batch=60)
    assert d.plan == CheckpointPlan(6, 0, 3) and d.predicted_peak == pytest.approx((75.4 - 3 * 4.7) * GiB)
    assert d.message == ("activation checkpointing (auto): band-axis modules of layers 3-5 (3 of 12); predicted "
                         "peak 61.3 GiB of a 62.0 GiB budget (measured 20.2 GiB with all checkpointed, +4.50 / "
                         "+4.70 GiB per time-axis / band-axis module kept)")


def test_batch_advice_keeps_the_effective_batch():
    # a 12 GB card: batch 5 needs 20.2 GiB; batch b needs 0.6 + 3.92 b GiB, so b = 2 fits 10 GiB (8.44 GiB)
    d = decide(10.0 * GiB, PAPER, batch_size=5, effective_batch=60)
    assert d.plan is None
    assert d.message == ("train.batch_size=5 does not fit: a training step needs 20.2 GiB even with full activation "
                         "checkpointing, 10.0 GiB are available; use --set train.batch_size=2 (predicted peak 8.4 GiB; "
                         "accumulation 30 keeps the effective batch 60)")
    # with 2 processes the batch must divide 60 / 2 = 30: 4 would fit 17 GiB but 3 is the largest divisor
    assert "train.batch_size=3 " in batch_advice(17.0 * GiB, PAPER, 5, 60, world=2)
    assert "accumulation 10 keeps the effective batch 60" in batch_advice(17.0 * GiB, PAPER, 5, 60, world=2)
    tiny_card = batch_advice(2.0 * GiB, PAPER, 5, 60)
    assert "nor does batch 1 (4.5 GiB)" in tiny_card and "data.segment_seconds" in tiny_card
    # measured at batch 1 because batch 5 ran out of memory in the dry run: advice even when the model would fit
    at_one = Footprint(6, 1, 0.6 * GiB, 3.92 * GiB, (math.inf, math.inf))
    assert decide(100.0 * GiB, at_one, 5, 60).message.startswith(
        "train.batch_size=5 does not fit: a training step ran out of memory even with full activation checkpointing")
    assert "train.batch_size=4 " in decide(17.0 * GiB, at_one, 5, 60).message


def test_processes_agree_on_the_largest_footprint_and_the_smallest_budget():
    other = Footprint(6, 5, 0.7 * GiB, 19.0 * GiB, (4.8 * GiB, 4.6 * GiB), (1.3 * GiB, 1.2 * GiB))  # another rank
    other_budget = 70.0 * GiB

    def agree(values):  # what Dist.max gives with two processes
        mine = [-other_budget, other.fixed, other.full / 5, other.per_module[0] / 5, other.per_module[1] / 5,
                other.conv_output[0] / 5, other.conv_output[1] / 5, 0.0]
        return [max(a, b) for a, b in zip(values, mine)]

    fp, budget = agree_over_processes(PAPER, 74.0 * GiB, 5, agree)
    assert budget == other_budget and fp.batch == 5
    assert (fp.fixed, fp.full) == (0.7 * GiB, 19.6 * GiB) and fp.per_module == pytest.approx((4.8 * GiB, 4.7 * GiB))
    assert fp.conv_output == (math.inf, math.inf)  # this rank's model cannot keep them: no rank does
    fp, _ = agree_over_processes(KEEPING, 74.0 * GiB, 5, agree)
    assert fp.conv_output == pytest.approx((1.3 * GiB, 1.27 * GiB))
    # one rank could not run batch 5 at all: everyone gets the advice from its batch-1 footprint
    at_one = Footprint(6, 1, 0.6 * GiB, 3.92 * GiB, (math.inf, math.inf))
    fp, _ = agree_over_processes(at_one, 10.0 * GiB, 5, agree)
    assert fp.batch == 1 and fp.per_module == (math.inf, math.inf)
    assert decide(10.0 * GiB, fp, 5, 60, world=2).plan is None


def test_memory_budget_counts_the_cache_and_the_per_process_cap(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 10 * GiB)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 1.0)
    budget, usable = memory_budget(torch.device("cuda"), margin=0.05, fragmentation=1.1, reserve=0.5 * GiB)
    assert usable == 70 * GiB and budget == pytest.approx(70 * GiB / 1.1 - 0.5 * GiB)
    budget, _ = memory_budget(torch.device("cuda"), margin=0.2, fragmentation=1.1, reserve=0.5 * GiB)
    assert budget == pytest.approx(70 * GiB / 1.2 - 0.5 * GiB)  # the margin is the least allowance
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 0.3)  # a 24 GB card
    budget, usable = memory_budget(torch.device("cuda"), margin=0.0, fragmentation=1.0, reserve=0.0)
    assert usable == budget == pytest.approx(24 * GiB)



@pytest.mark.parametrize("usable_gib, frac, expected", [(78.4, 1.0, "none"), (23.5, 23.5 / 80, "full")])
def test_h100_measurement_fits_80_and_24_gb(monkeypatch, usable_gib, frac, expected):
    """The paper config at batch 5 as measured on an H100 (bench_memory.py, 2026-12-07): 19.3 GiB with every module
    checkpointed (0.9 of it fixed), +3.13 GiB per module kept, fragmentation 1.165; measured with full checkpointing
    19.3 GiB allocated, 22.3 reserved, so a 24-GB card (23.5 GiB usable) trains with full checkpointing, and 80 GB
    with none (50.4 GiB measured)."""
    total = 80 * GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (78.4 * GiB, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: frac)
    measured = Footprint(depth=6, batch=5, fixed=0.9 * GiB, full=18.4 * GiB, per_module=(3.13 * GiB, 3.13 * GiB))
    budget, usable = memory_budget(torch.device("cuda"), fragmentation=1.165)
    assert usable == pytest.approx(min(78.4, frac * 80) * GiB)
    decision = decide(budget, measured, batch_size=5, effective_batch=5)
    assert decision.plan is not None
    assert decision.plan == (CheckpointPlan.none(6) if expected == "none" else CheckpointPlan.full(6))

# ---------------------------------------------------------------- partial checkpointing in the models


@pytest.mark.parametrize("arch", ["bsmamba2", "bsroformer"])
def test_partial_checkpointing_gives_the_same_gradients(arch):
    torch.manual_seed(3)
    cfg = (BSMamba2Config if arch == "bsmamba2" else RoFormerConfig).tiny(depth=2)
    model = build_model(cfg).double().train()
    wave = torch.randn(1, 2, 2205, dtype=torch.float64)

    def grads(selection) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.activation_checkpointing = selection
        model.forward_waveform(wave).pow(2).mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    reference = grads(False)
    for selection in (CheckpointPlan(2, 1, 0).selection(), CheckpointPlan(2, 1, 2).selection(), True):
        for g, ref in zip(grads(selection), reference):
            torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- measuring (CPU, with a probe)


@pytest.mark.parametrize("arch", ["bsmamba2", "bsroformer"])
def test_measured_footprint_predicts_every_plan(arch):
    """The cost model from three dry runs predicts the bytes saved with no checkpointing and with a partial plan."""
    torch.manual_seed(4)
    model = build_model((BSMamba2Config if arch == "bsmamba2" else RoFormerConfig).tiny(depth=3))
    loss_fn = SeparationLoss(10.0, (512,), 147, 512)  # one resolution: fast
    rng_before = torch.get_rng_state()
    fp = measure_footprint(model, loss_fn, 2, 2205, contextlib.nullcontext, SavedBytes(), extra_fixed=24.0)
    assert fp.batch == 2 and fp.fixed == 1024.0 and all(a > 0 for a in fp.per_module)
    # the plain path recomputes nothing (BSMamba2 keeps nothing more), and BS-RoFormer has no conv: not offered
    assert fp.conv_output == (math.inf, math.inf) and model.kept_conv_outputs == frozenset()
    assert model.can_keep_conv_outputs == (arch == "bsmamba2")
    # the model is left as it was: setting, training mode, no gradients, same random stream
    assert model.activation_checkpointing is False and model.training
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng_before)

    wave, tgt = 0.1 * torch.randn(2, 2, 2205), 0.05 * torch.randn(2, 1, 2, 2205)
    for plan in (CheckpointPlan.none(3), CheckpointPlan(3, 1, 2), CheckpointPlan.full(3)):
        model.activation_checkpointing = plan.selection()

        def step():
            loss_fn(model.forward_waveform(wave), tgt)[0].backward()

        assert SavedBytes()(step) + fp.fixed == pytest.approx(fp.peak(plan), rel=1e-9), plan
        model.zero_grad(set_to_none=True)


def test_measurement_that_runs_out_of_memory_falls_back():
    torch.manual_seed(5)
    model = build_model(BSMamba2Config.tiny(depth=2))
    loss_fn = SeparationLoss(10.0, (512,), 147, 512)  # one resolution: fast
    full = measure_footprint(model, loss_fn, 2, 2205, contextlib.nullcontext, SavedBytes())
    # room for full checkpointing only: the modules that did not fit are never kept
    fp = measure_footprint(model, loss_fn, 2, 2205, contextlib.nullcontext, SavedBytes(limit=full.full * 1.01))
    assert fp.full == full.full and fp.per_module == (math.inf, math.inf)
    assert choose_plan(1e12, fp, plans_by_speed(fp)) == CheckpointPlan.full(2)
    # not even full checkpointing at batch 2: measured at batch 1, for the advice
    fp = measure_footprint(model, loss_fn, 2, 2205, contextlib.nullcontext, SavedBytes(limit=full.full * 0.9))
    assert fp.batch == 1 and full.full / 2 <= fp.full < 0.9 * full.full  # (more than half: weights saved for backward)
    d = decide(fp.fixed + fp.full * 1.01, fp, batch_size=2, effective_batch=4)
    assert d.plan is None and "use --set train.batch_size=1 " in d.message and "accumulation 4" in d.message
    assert all(p.grad is None for p in model.parameters()) and model.activation_checkpointing is False


def test_kept_conv_outputs_setting():
    model = build_model(BSMamba2Config.tiny(depth=2))
    model.kept_conv_outputs = CheckpointPlan(2, 0, 0, keep=3).kept()
    assert model.kept_conv_outputs == {(0, 0), (0, 1), (1, 0)}
    assert [m.keep_conv_output for layer in model.layers for m in layer] == [True, True, True, False]
    model.kept_conv_outputs = frozenset()
    assert not any(m.keep_conv_output for layer in model.layers for m in layer)
    roformer = build_model(RoFormerConfig.tiny(depth=2))
    roformer.kept_conv_outputs = frozenset()  # nothing to keep: accepted
    with pytest.raises(ValueError, match="no conv output to keep"):
        roformer.kept_conv_outputs = frozenset({(0, 0)})


def test_auto_on_cpu_is_no_checkpointing():
    model = build_model(BSMamba2Config.tiny())
    d = auto_checkpointing(model, SeparationLoss(), 2, 2205, contextlib.nullcontext, effective_batch=4)
    assert d.plan == CheckpointPlan.none(1) and d.plan.selection() is False
    assert d.message == ("activation checkpointing (auto): none on cpu (no memory probe there; if the run runs out of "
                         "RAM, set train.activation_checkpointing=true or lower train.batch_size)")
