"""Checkpoints: official Lightning files load safely and strictly; malicious pickles run nothing; own format."""

import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from bsmamba2.checkpoint import (Placeholder, UnsafeCheckpointError, infer_config, load_model, official_state_dict,
                                 read_metadata, read_official_checkpoint, save_model)
from bsmamba2.config import BSMamba2Config, RoFormerConfig
from bsmamba2.build import build_model
from bsmamba2.model import BSMamba2


def test_official_tiny_loads_with_config_inferred(official_ckpt):
    model = load_model(official_ckpt)
    cfg = model.config
    assert isinstance(model, BSMamba2) and not model.training
    assert (cfg.dim, cfg.depth, cfg.stereo, cfg.mask_estimator_depth) == (48, 2, True, 2)
    assert (cfg.mamba.expand, cfg.mamba.d_state, cfg.mamba.headdim, cfg.mamba.d_conv) == (4, 128, 64, 4)
    assert len(cfg.band_widths) == 62 and sum(cfg.band_widths) == 1025


def test_official_hyper_parameters_become_inert_placeholders(official_ckpt):
    """OmegaConf is not needed: its objects are rebuilt as inert placeholders."""
    ckpt = read_official_checkpoint(official_ckpt)
    hp = ckpt["hyper_parameters"]["hparams"]
    assert isinstance(hp, Placeholder)
    assert "omegaconf" in repr(hp)
    code = ("import sys; from bsmamba2.checkpoint import load_model; "
            f"load_model({str(official_ckpt)!r}); print('omegaconf' in sys.modules or 'lightning' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_full_size_manifest_maps_onto_paper_model(shared_dir):
    manifest = json.loads((shared_dir / "fixtures/official/official_full_manifest.json").read_text())
    state = {k: torch.randn(shape) for k, shape in manifest["state_dict_shapes"].items()}
    state = official_state_dict({"state_dict": state})
    cfg = infer_config(state)
    assert cfg == BSMamba2Config()
    model = build_model(cfg)
    model.load_state_dict(state, strict=True)
    assert sum(p.numel() for p in model.parameters()) == manifest["params"]


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("where", ["top", "hyper_parameters", "state_dict"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, where):
    marker = tmp_path / "pwned"
    ckpt = {"state_dict": {"model.final_norm.gamma": torch.ones(4)}, "hyper_parameters": {"a": 1}}
    if where == "top":
        ckpt = _Payload(marker)
    elif where == "hyper_parameters":
        ckpt["hyper_parameters"] = {"cfg": _Payload(marker)}
    else:
        ckpt["state_dict"]["model.x"] = _Payload(marker)
    path = tmp_path / "evil.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(UnsafeCheckpointError, match="refusing.*system"):
        load_model(path)
    assert not marker.exists()


def test_placeholder_classes_cannot_be_called_through_defaultdict(tmp_path):
    """A non-allowed class smuggled in as a factory stays inert (never instantiated by us)."""
    import collections

    marker = tmp_path / "pwned2"
    path = tmp_path / "evil2.ckpt"
    torch.save({"state_dict": collections.defaultdict(_Payload)}, path)
    with pytest.raises((UnsafeCheckpointError, ValueError)):
        load_model(path)
    assert not marker.exists()


def test_own_format_round_trips_bit_exactly(tmp_path):
    for cfg in (BSMamba2Config.tiny(stems=("vocals", "drums")), RoFormerConfig.tiny(stereo=False)):
        model = build_model(cfg)
        path = save_model(model, tmp_path / "m.safetensors", metadata={"trained_on": "noise"})
        loaded = load_model(path)
        assert loaded.config == cfg
        for (ka, a), (kb, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert ka == kb and torch.equal(a, b)
        assert read_metadata(path)["metadata"] == {"trained_on": "noise"}
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_half_precision_storage_halves_the_file_and_loads(tmp_path):
    model = build_model(BSMamba2Config.tiny())
    full = save_model(model, tmp_path / "full.safetensors")
    half = save_model(model, tmp_path / "half.safetensors", dtype=torch.float16)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = load_model(half)
    for a, b in zip(model.parameters(), loaded.parameters()):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a.half().float())


def test_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.ckpt")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_model(junk)
    broken = tmp_path / "broken.ckpt"
    with zipfile.ZipFile(broken, "w") as z:
        z.writestr("broken/data.pkl", b"\x80\x02}q\x00.")  # an empty dict: no state_dict
    with pytest.raises(ValueError, match="state_dict"):
        load_model(broken)


def test_training_checkpoint_gets_a_hint_to_export(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"version": 1, "model": {}, "ema": {"model": {}}, "optimizer": {}}, path)
    with pytest.raises(ValueError, match="bsmamba2 export"):
        load_model(path)


def test_mismatched_weights_are_refused(tmp_path):
    model = build_model(BSMamba2Config.tiny())
    path = save_model(model, tmp_path / "m.safetensors")
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    state["final_norm.gamma"] = torch.ones(3)
    save_file(state, str(path), metadata={"format": "bsmamba2", "format_version": "1",
                                          "config": json.dumps(read_metadata(path)["config"])})
    with pytest.raises(ValueError, match="do not match"):
        load_model(path)
