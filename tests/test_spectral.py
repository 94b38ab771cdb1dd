"""BandSplit / MaskEstimator: the grouped fast path against the per-band loop, parameter names, autocast."""

import pytest
import torch
from torch import nn

from bsmamba2.checkpoint import load_model
from bsmamba2.config import PAPER_BAND_WIDTHS, BSMamba2Config
from bsmamba2.model import BSMamba2
from bsmamba2.spectral import BandSplit, MaskEstimator, _band_groups, band_feature_sizes, features_to_spec

PAPER_STEREO = band_feature_sizes(PAPER_BAND_WIDTHS, 2)
SIZES = {
    "paper-stereo": PAPER_STEREO,
    "paper-mono": band_feature_sizes(PAPER_BAND_WIDTHS, 1),
    "unordered": (8, 16, 8, 8, 24, 16, 4),  # groups that are not runs: the reordering path
    "one-band": (12,),
    "one-size": (6, 6, 6),
}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def perturbed(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Random parameters all over: gammas away from 1, biases away from 0."""
    module = module.to(dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return module


def grads_of(module: nn.Module, forward, x: torch.Tensor, upstream: torch.Tensor):
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = forward(x)
    y.backward(upstream)
    return y.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


def assert_same_function(module: nn.Module, x: torch.Tensor, tol: float):
    """Output, input gradient and every parameter gradient of `forward_grouped` equal `forward_reference`."""
    upstream = torch.randn_like(module.forward_reference(x))
    y_ref, gx_ref, gp_ref = grads_of(module, module.forward_reference, x, upstream)
    y, gx, gp = grads_of(module, module.forward_grouped, x, upstream)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert rel(y, y_ref) <= tol
    assert rel(gx, gx_ref) <= tol
    assert gp.keys() == gp_ref.keys()
    for name, g in gp.items():
        assert g is not None and gp_ref[name] is not None, name
        assert rel(g, gp_ref[name]) <= tol, name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("table", list(SIZES))
def test_band_split_grouped_equals_loop(table, dtype):
    sizes = SIZES[table]
    module = perturbed(BandSplit(16, sizes), dtype)
    assert_same_function(module, torch.randn(2, 7, sum(sizes), dtype=dtype), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("table, depth",
                         [(t, 2) for t in SIZES] + [("unordered", 1), ("unordered", 3), ("one-band", 1)])
def test_mask_estimator_grouped_equals_loop(table, depth, dtype):
    sizes = SIZES[table]
    module = perturbed(MaskEstimator(16, sizes, depth=depth), dtype)
    assert_same_function(module, torch.randn(2, 7, len(sizes), 16, dtype=dtype), TOL[dtype])


@pytest.mark.parametrize("module_cls", [BandSplit, MaskEstimator])
@pytest.mark.parametrize("table", ["paper-stereo", "unordered"])
def test_grouped_inference_paths_equal_loop(module_cls, table):
    """Without autograd the grouped paths take their own shortcuts (the band split writes the bands in place, the
    mask estimator's hidden layers take the bias inside the product): same function as the loop."""
    sizes = SIZES[table]
    module = perturbed(module_cls(16, sizes), torch.float64)
    x = torch.randn(2, 7, sum(sizes)) if module_cls is BandSplit else torch.randn(2, 7, len(sizes), 16)
    with torch.no_grad():
        y, ref = module.forward_grouped(x.double()), module.forward_reference(x.double())
    assert y.shape == ref.shape and rel(y, ref) <= 1e-10
    if module_cls is BandSplit:  # bands before frames in memory, for the time pass
        assert y.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("table, channels", [("paper-stereo", 2), ("paper-mono", 1), ("one-size", 1),
                                            ("unordered", 2)])
def test_mask_estimator_spectral_masks_equal_features(table, channels):
    """`forward_spec` (masks written straight into the spectrum's memory order; the unordered table falls back to
    features) against `features_to_spec` of the per-band loop: output, input and parameter gradients."""
    sizes = SIZES[table]
    module = perturbed(MaskEstimator(16, sizes), torch.float64)
    module.grouped = True
    x = torch.randn(2, 7, len(sizes), 16, dtype=torch.float64)
    upstream = torch.randn(2, channels, sum(sizes) // (2 * channels), 7, 2)
    y_ref, gx_ref, gp_ref = grads_of(module, lambda v: torch.view_as_real(
        features_to_spec(module.forward_reference(v), channels)), x, upstream)
    y, gx, gp = grads_of(module, lambda v: torch.view_as_real(module.forward_spec(v, channels)), x, upstream)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype == torch.float32
    assert rel(y, y_ref) <= 1e-6 and rel(gx, gx_ref) <= 1e-6
    for name, g in gp.items():
        assert rel(g, gp_ref[name]) <= 1e-6, name
    if table == "paper-stereo":  # frequency fastest in memory, as `stft` lays out a spectrum
        assert y.stride()[-3:] == (2, 2 * y.shape[-3], 1)


def test_paper_table_forms_seven_groups_in_band_order():
    groups = _band_groups(PAPER_STEREO)
    assert [(n, len(idx)) for n, idx in groups] == [(8, 24), (16, 12), (48, 8), (96, 8), (192, 8), (512, 1), (516, 1)]
    assert [i for _, idx in groups for i in idx] == list(range(62))
    assert BandSplit(16, PAPER_STEREO)._in_order and not BandSplit(16, SIZES["unordered"])._in_order


@pytest.mark.parametrize("module_cls", [BandSplit, MaskEstimator])
def test_autocast_bf16_grouped_matches_loop(module_cls):
    sizes = SIZES["paper-stereo"]
    module = perturbed(module_cls(32, sizes), torch.float32)
    shape = (2, 5, sum(sizes)) if module_cls is BandSplit else (2, 5, len(sizes), 32)
    x, upstream = torch.randn(shape), None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        upstream = torch.randn_like(module.forward_reference(x).float())
        y_ref, gx_ref, gp_ref = grads_of(module, module.forward_reference, x, upstream)
        y, gx, gp = grads_of(module, module.forward_grouped, x, upstream)
    assert y.dtype == y_ref.dtype == torch.bfloat16  # the matmuls ran in bf16 on both paths
    assert rel(y.float(), y_ref.float()) <= 1e-2
    assert rel(gx.float(), gx_ref.float()) <= 2e-2
    for name, g in gp.items():
        assert g.dtype == torch.float32 and rel(g, gp_ref[name]) <= 2e-2, name


def test_forward_dispatch():
    module = perturbed(MaskEstimator(8, (4, 4, 8)), torch.float64)
    x = torch.randn(1, 3, 3, 8, dtype=torch.float64)
    with torch.no_grad():
        grouped, loop = module.forward_grouped(x), module.forward_reference(x)
        assert module.grouped is None and torch.equal(module(x), loop)  # default on CPU: the loop
        module.grouped = True
        assert torch.equal(module(x), grouped)
        module.grouped = False
        assert torch.equal(module(x), loop)


def test_parameter_names_unchanged_and_state_dict_round_trips():
    sizes = SIZES["paper-stereo"]
    split, est = BandSplit(16, sizes), MaskEstimator(16, sizes)
    assert list(split.state_dict()) == [f"to_features.{i}.{k}" for i in range(62)
                                        for k in ("0.gamma", "1.weight", "1.bias")]
    assert list(est.state_dict()) == [f"to_freqs.{i}.0.{k}" for i in range(62)
                                      for k in ("0.weight", "0.bias", "2.weight", "2.bias")]
    assert split.state_dict()["to_features.61.1.weight"].shape == (16, 516)
    assert est.state_dict()["to_freqs.61.0.2.weight"].shape == (2 * 516, 64)

    keys = set(BSMamba2(BSMamba2Config.tiny()).state_dict())
    assert {"band_split.to_features.0.0.gamma", "band_split.to_features.61.1.bias",
            "mask_estimators.0.to_freqs.0.0.0.weight", "mask_estimators.0.to_freqs.61.0.2.bias"} <= keys
    assert not any("group" in k for k in keys)

    # weights saved from one module load by key into a fresh one, whose grouped path then gives the same function
    source = perturbed(MaskEstimator(16, sizes), torch.float32)
    target = MaskEstimator(16, sizes)
    target.load_state_dict(source.state_dict(), strict=True)
    x = torch.randn(1, 4, 62, 16)
    with torch.no_grad():
        assert rel(target.forward_grouped(x), source.forward_reference(x)) <= 1e-5


def test_official_parity_with_grouped_path(official_ckpt, official_io):
    model = load_model(official_ckpt)
    for module in [model.band_split, *model.mask_estimators]:
        module.grouped = True
    with torch.no_grad():
        spec = model(torch.from_numpy(official_io["mixture_spec"])[None])[0, 0]
    assert rel(spec, torch.from_numpy(official_io["vocals_spec"])) <= 1e-4
