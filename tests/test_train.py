"""Training loop: kill-and-resume gives identical weights, 2-process DDP (gloo) keeps ranks identical and equals one
process with the same effective batch, EMA, checkpoints, CLI train + export."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bsmamba2 import cli
from bsmamba2.build import build_model
from bsmamba2.checkpoint import load_model, save_model
from bsmamba2.train import EMA, accumulation_steps, learning_rate, load_checkpoint, train
from bsmamba2.trainconfig import (RunConfig, TrainConfig, apply_overrides, load_run_config, run_config_from_dict,
                                  run_config_to_dict)

# Small and fast: 0.25-s excerpts, batch 2 × accumulation 2, 1 optimiser step per epoch (validation at each).
TEST_OVERRIDES = [
    "data.segment_seconds=0.25",
    "data.valid_max_excerpts=2",
    "model.mask_estimator_depth=1",
    "train.batch_size=2",
    "train.effective_batch=4",
    "train.epoch_samples=4",
    "train.epochs=2",
    "train.valid_batch_size=2",
    "train.save_every_steps=1",
    "train.warmup_steps=2",  # the schedule runs through resume and DDP: step 1 at half the rate
    "train.device=cpu",
]


def _config(root: Path, *extra: str) -> RunConfig:
    return load_run_config("tiny", [*TEST_OVERRIDES, f"data.root={root}", *extra])


def _assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs by up to {(a[k] - b[k]).abs().max().item():.3g}"


def _run_script(code: str, tmp_path: Path, *, torchrun: int = 0, env: dict | None = None) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    cmd = [sys.executable, str(script)]
    if torchrun:
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={torchrun}",
               "--master-addr=127.0.0.1", f"--master-port={port}", str(script)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=full_env)


# ---------------------------------------------------------------- config


def test_configs_load_and_override():
    paper = load_run_config("bsmamba2-paper")
    assert (paper.model.dim, paper.model.depth, len(paper.model.band_widths)) == (256, 6, 62)
    assert (paper.train.lr, paper.train.batch_size, paper.train.effective_batch) == (5e-4, 5, 60)
    assert paper.train.precision == "bf16" and paper.train.grad_clip == 3.0 and paper.train.ema_decay == 0.999
    rof = load_run_config("bsroformer-paper.yaml")
    assert (rof.model.arch, rof.model.dim, rof.train.batch_size, rof.train.effective_batch) == ("bsroformer", 384, 4, 64)
    # the paper configs fit the user's GPU: checkpointing is measured and chosen before the first step
    assert paper.train.activation_checkpointing == rof.train.activation_checkpointing == "auto"
    assert load_run_config("tiny", ["train.activation_checkpointing=true"]).train.activation_checkpointing is True
    cfg = load_run_config("tiny", ["train.lr=3e-4", "model.mamba.d_state=4", "data.stems=[vocals, other]"])
    assert cfg.train.lr == 3e-4 and cfg.model.mamba.d_state == 4 and cfg.data.stems == ("vocals", "other")
    assert run_config_from_dict(run_config_to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="unknown setting"):
        load_run_config("tiny", ["train.lrr=1"])
    with pytest.raises(ValueError, match="section.key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(FileNotFoundError, match="tiny.yaml"):
        load_run_config("no-such-config")
    # a value of the wrong kind is refused with the setting's name, before anything runs
    with pytest.raises(ValueError, match=r"train.silence_weight: expected a number, got 'abc'"):
        load_run_config("tiny", ["train.silence_weight=abc"])
    with pytest.raises(ValueError, match=r"train.batch_size: expected a whole number, got 2.5"):
        load_run_config("tiny", ["train.batch_size=2.5"])
    with pytest.raises(ValueError, match=r"train.compile: expected true or false, got 'yes please'"):
        load_run_config("tiny", ["train.compile=yes please"])
    with pytest.raises(ValueError, match=r"model.mamba.d_state: expected a whole number, got 1.5"):
        load_run_config("tiny", ["model.mamba.d_state=1.5"])
    with pytest.raises(ValueError, match=r"model.dim: expected a number, got 'wide'"):
        load_run_config("tiny", ["model.dim=wide"])
    cfg = load_run_config("tiny", ["train.batch_size=4.0", "train.lr=1", "train.max_steps=null"])
    assert cfg.train.batch_size == 4 and isinstance(cfg.train.batch_size, int) and cfg.train.lr == 1.0


def test_accumulation_keeps_effective_batch():
    assert accumulation_steps(60, 5, 2) == 6  # the paper: 5 × 2 GPUs × 6
    assert accumulation_steps(60, 5, 4) == 3
    assert accumulation_steps(60, 5, 1) == 12
    with pytest.raises(ValueError, match="not a multiple"):
        accumulation_steps(60, 5, 8)


def test_learning_rate_warms_up_then_decays_by_cosine():
    tc = TrainConfig(lr=1e-3, warmup_steps=4, decay_steps=10, final_lr_fraction=0.1)
    rates = [learning_rate(tc, step) for step in range(20)]
    assert rates[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear, never 0
    assert rates[4] == pytest.approx(1e-3)  # the top of the cosine
    assert rates[9] == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half way down
    assert all(a > b for a, b in zip(rates[4:14], rates[5:15]))  # strictly falling
    assert rates[14:] == pytest.approx([1e-4] * 6)  # held at lr * final_lr_fraction
    assert {learning_rate(TrainConfig(lr=5e-4), step) for step in (0, 1, 10**6)} == {5e-4}  # the paper: constant


def test_ema_update_and_warmup():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.999)
    before = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # first update: decay min(0.999, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.model.weight, d * before + (1 - d) * model.weight)
    for _ in range(5000):
        ema.update(model)
    assert torch.allclose(ema.model.weight, model.weight, atol=1e-5)
    assert not ema.model.weight.requires_grad


def test_ema_model_scores_its_current_weights_when_foreach_does_not_bump_versions(monkeypatch):
    """Validation runs the EMA model without autograd, where the band layers reuse weights derived from the
    parameters while their version counters stand still. CUDA's multi-tensor lerp does not bump them (the CPU's does):
    replayed here with a lerp that writes through `.data`. The EMA model must then still compute with its new weights,
    as a freshly built model holding them does (no cache)."""
    from bsmamba2.build import build_model
    from bsmamba2.config import BSMamba2Config

    def lerp_without_version_bump(tensors, ends, weight):
        for t, e in zip(tensors, ends):
            t.data.lerp_(e.data, weight)

    torch.manual_seed(0)
    cfg = BSMamba2Config.tiny()
    model = build_model(cfg)
    ema = EMA(model, decay=0.5)
    for module in ema.model.modules():  # the GPU's band layers: stacked weights, cached without autograd
        if hasattr(module, "grouped"):
            module.grouped = True
    wave = 0.1 * torch.randn(1, 2, 44100)
    with torch.no_grad():
        first = ema.model.forward_waveform(wave)  # fills the caches
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    monkeypatch.setattr(torch, "_foreach_lerp_", lerp_without_version_bump)
    ema.update(model)
    fresh = build_model(cfg).eval()  # the per-band loop on the CPU: nothing cached
    fresh.load_state_dict(ema.model.state_dict())
    with torch.no_grad():
        got, want = ema.model.forward_waveform(wave), fresh.forward_waveform(wave)
    assert not torch.allclose(want, first, atol=1e-4)  # the update changed what the model computes
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the loop


@pytest.fixture(scope="module")
def straight_run(tiny_musdb, tmp_path_factory):
    """Two optimiser steps without interruption (two epochs, validation after each)."""
    out = tmp_path_factory.mktemp("straight")
    result = train(_config(tiny_musdb), out)
    return out, result


def test_straight_run_writes_checkpoints_and_logs(straight_run):
    out, result = straight_run
    assert result.step == 2 and result.epoch == 2
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2] and all(math.isfinite(h["val_usdr"]) for h in history)
    assert all(h["val_leakage_db"] is None or math.isfinite(h["val_leakage_db"]) for h in history)
    lr = load_run_config("tiny").train.lr
    assert [h["lr"] for h in history] == pytest.approx([lr / 2, lr])  # warm-up over 2 steps
    assert result.best_usdr == max(h["val_usdr"] for h in history)
    last, best = load_checkpoint(out / "last.pt"), load_checkpoint(out / "best.pt")
    assert last["step"] == 2 and last["samples_seen"] == 8 and last["effective_batch"] == 4
    assert best["step"] in (1, 2) and best["best_usdr"] == pytest.approx(max(h["val_usdr"] for h in history[: best["epoch"]]))
    assert set(last) >= {"model", "ema", "optimizer", "scaler", "step", "epoch", "rng", "config", "history"}
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert (out / "config.yaml").is_file()
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries
    # training moved the weights away from their initialisation, and the EMA is not the raw model
    _assert_same_state(last["model"], {k: v for k, v in result.model.state_dict().items()}, "returned model")
    assert any(not torch.equal(last["model"][k], last["ema"]["model"][k]) for k in last["model"])


def test_sigkill_and_resume_gives_identical_weights(straight_run, tiny_musdb, tmp_path):
    """Train in a subprocess that SIGKILLs itself right after step 1's checkpoint (and validation), resume to 2 steps:
    model, EMA and optimiser state equal the uninterrupted run's bit for bit."""
    straight_out, _ = straight_run
    out = tmp_path / "killed"
    overrides = [*TEST_OVERRIDES, f"data.root={tiny_musdb}"]
    proc = _run_script(
        f"""
        import os, signal, torch
        torch.set_num_threads(2)
        from bsmamba2.train import train
        from bsmamba2.trainconfig import load_run_config

        def crash(step):
            if step == 1:
                os.kill(os.getpid(), signal.SIGKILL)

        train(load_run_config("tiny", {overrides!r}), {str(out)!r}, on_step_end=crash)
        """,
        tmp_path,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert load_checkpoint(out / "last.pt")["step"] == 1
    result = train(_config(tiny_musdb), out, resume=True)
    assert result.step == 2
    a, b = load_checkpoint(straight_out / "last.pt"), load_checkpoint(out / "last.pt")
    _assert_same_state(a["model"], b["model"], "model")
    _assert_same_state(a["ema"]["model"], b["ema"]["model"], "ema")
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        _assert_same_state(sa, sb, "optimizer")
    keys = ("step", "epoch", "val_usdr", "val_loss", "train_loss", "lr")
    assert [[h[k] for k in keys] for h in a["history"]] == [[h[k] for k in keys] for h in b["history"]]
    assert a["best_usdr"] == b["best_usdr"]


def test_ddp_two_processes_gloo(straight_run, tiny_musdb, tmp_path):
    """torchrun, 2 processes on CPU (gloo), batch 1 each × accumulation 2 = the straight run's effective batch 4:
    both ranks end with identical weights, equal (up to float summation order) to the one-process run."""
    straight_out, _ = straight_run
    out = tmp_path / "ddp"
    overrides = [*TEST_OVERRIDES, f"data.root={tiny_musdb}", "train.batch_size=1", "train.valid_batch_size=1"]
    proc = _run_script(
        f"""
        import os, torch
        from bsmamba2.train import cleanup_distributed, train
        from bsmamba2.trainconfig import load_run_config

        result = train(load_run_config("tiny", {overrides!r}), {str(out)!r})
        torch.save(result.model.state_dict(), {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.pt")
        cleanup_distributed()
        """,
        tmp_path,
        torchrun=2,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    _assert_same_state(r0, r1, "rank 0 vs rank 1")
    ckpt = load_checkpoint(out / "last.pt")  # written by rank 0 only, with both ranks' RNG states
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["step"] == 2
    single = load_checkpoint(straight_out / "last.pt")["model"]
    for k in r0:
        assert torch.allclose(r0[k], single[k], rtol=1e-3, atol=1e-4), k
    # same effective batch 4: batch 1 × 2 processes × accumulation 2 here, batch 2 × 1 process × 2 straight
    assert ckpt["accumulation"] == 2 and ckpt["effective_batch"] == 4
    # the 2-process run resumes in one process: accumulation becomes 4, the stream continues at sample 8
    result = train(_config(tiny_musdb, "train.batch_size=1", "train.max_steps=3"), out, resume=True)
    ckpt = load_checkpoint(out / "last.pt")
    assert result.step == 3 and ckpt["accumulation"] == 4 and ckpt["world_size"] == 1 and len(ckpt["rng"]) == 1


def test_cli_train_resume_and_export(tiny_musdb, tmp_path, caplog):
    out = tmp_path / "run"
    args = ["train", "--config", "tiny", "--data", str(tiny_musdb), "--out", str(out)]
    sets = [x for o in TEST_OVERRIDES for x in ("--set", o)]
    # a zero time limit stops after the first step, with last.pt written
    assert cli.main([*args, *sets, "--set", "train.time_limit_minutes=0"]) == 0
    assert load_checkpoint(out / "last.pt")["step"] == 1
    # a second start without --resume refuses to overwrite the run
    assert cli.main([*args, *sets]) == 1
    assert "--resume" in caplog.text
    # resuming with another model size is refused, naming the setting
    assert cli.main(["train", "--out", str(out), "--resume", "--set", "model.dim=24"]) == 1
    assert "different model config (dim: 16 vs 24" in caplog.text
    # resume reads RUN_DIR/config.yaml when no --config is given
    assert cli.main(["train", "--out", str(out), "--resume", "--set", "train.max_steps=2"]) == 0
    assert load_checkpoint(out / "last.pt")["step"] == 2
    # export: the EMA weights, loadable by the inference loader, with the run's config
    assert cli.main(["export", str(out), str(tmp_path / "model.safetensors")]) == 0
    model = load_model(tmp_path / "model.safetensors")
    ckpt = load_checkpoint(out / "best.pt")
    _assert_same_state(model.state_dict(), ckpt["ema"]["model"], "exported EMA")
    assert model.config == run_config_from_dict(ckpt["config"]).model
    assert cli.main(["train", "--out", str(tmp_path / "nothing"), "--resume"]) == 1


def test_bar_into_a_log_is_redrawn_rarely(tiny_musdb, tmp_path, capsys):
    """With stderr not a terminal (a batch job's log) the step bar is redrawn at most every 30 s, not per step."""
    args = ["train", "--config", "tiny", "--data", str(tiny_musdb), "--out", str(tmp_path / "run")]
    assert cli.main([*args, *[x for o in TEST_OVERRIDES for x in ("--set", o)], "--set", "train.max_steps=12"]) == 0
    draws = capsys.readouterr().err.count("train:")
    assert 1 <= draws <= 3, draws  # the first draw, the last, and at most one between


def test_init_from_starts_a_new_run_from_those_weights(tiny_musdb, tmp_path, caplog):
    """Fine-tuning: with train.init_from a new run starts from the file's weights instead of its seed's (at lr 0 the
    model and its EMA stay exactly those through a step), the run's config records the source, and a model of
    another size is refused before training with the differing settings named."""
    config = _config(tiny_musdb)
    torch.manual_seed(123)
    source = build_model(config.model)
    start = tmp_path / "start.safetensors"
    save_model(source, start)
    torch.manual_seed(config.train.seed)
    seeded = build_model(config.model).state_dict()  # what the run would start from without init_from
    assert any(not torch.equal(seeded[k], v) for k, v in source.state_dict().items())
    with caplog.at_level("INFO", logger="bsmamba2.train"):
        result = train(_config(tiny_musdb, f"train.init_from={start}", "train.lr=0", "train.max_steps=1"),
                       tmp_path / "run")
    assert result.step == 1
    _assert_same_state(result.model.state_dict(), source.state_dict(), "model after a step at lr 0")
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    _assert_same_state(last["ema"]["model"], source.state_dict(), "EMA after a step at lr 0")
    assert last["config"]["train"]["init_from"] == str(start)
    assert f"initialized the model from {start}" in caplog.text

    other = tmp_path / "wider.safetensors"
    save_model(build_model(_config(tiny_musdb, "model.dim=24").model), other)
    with pytest.raises(ValueError, match=r"do not fit the run's model \(run vs checkpoint: dim: 16 vs 24"):
        train(_config(tiny_musdb, f"train.init_from={other}"), tmp_path / "run2")
    assert not (tmp_path / "run2" / "last.pt").exists()
    # weights that fit from a model with another STFT hop: trained on, with the difference in a warning
    hop = tmp_path / "hop.safetensors"
    save_model(build_model(_config(tiny_musdb, "model.stft.hop_length=512").model), hop)
    caplog.clear()
    train(_config(tiny_musdb, f"train.init_from={hop}", "train.max_steps=1"), tmp_path / "run4")
    assert "these model settings differ (run vs checkpoint): stft.hop_length: 441 vs 512" in caplog.text
    with pytest.raises(ValueError, match="train.init_from=1.5; expected a model name"):
        train(_config(tiny_musdb, "train.init_from=1.5"), tmp_path / "run3")


def test_grow_depth_starts_a_deeper_run_from_the_checkpoints_function(tiny_musdb, tmp_path, caplog):
    """`train.grow_depth`: a run with more layers than its `init_from` checkpoint takes the checkpoint's layers as its
    first ones and starts each extra layer as the identity, so at lr 0 it computes exactly what the checkpoint does;
    with a learning rate the new layers train. Without the setting the deeper run is refused with a pointer to it;
    a shallower run, or the setting without init_from, is refused too."""
    torch.manual_seed(5)
    source = build_model(_config(tiny_musdb).model)
    start = save_model(source, tmp_path / "one_layer.safetensors")
    deeper = ("model.depth=3", f"train.init_from={start}", "train.max_steps=1")
    with caplog.at_level("INFO", logger="bsmamba2.train"):
        result = train(_config(tiny_musdb, *deeper, "train.grow_depth=true", "train.lr=0"), tmp_path / "run")
    assert "layers 1-2 added as identity (train.grow_depth)" in caplog.text
    assert "these model settings differ" not in caplog.text
    grown = result.model.eval()
    for key, value in source.state_dict().items():
        assert torch.equal(grown.state_dict()[key], value), key
    spec = torch.randn(1, 2, 1025, 20, dtype=torch.complex64)
    with torch.no_grad():
        torch.testing.assert_close(grown(spec), source.eval()(spec), rtol=0, atol=0)
    trained = train(_config(tiny_musdb, *deeper, "train.grow_depth=true", "train.lr=1e-3"), tmp_path / "run2").model
    assert all(p.weight.abs().sum() > 0 for i in (1, 2) for p in trained.branch_outputs(trained.layers[i]))
    # resumed with the same settings but without init_from (as a chained call passes them): from last.pt
    resumed = train(_config(tiny_musdb, "model.depth=3", "train.grow_depth=true", "train.lr=1e-3", "train.max_steps=2"),
                    tmp_path / "run2", resume=True)
    assert resumed.step == 2

    with pytest.raises(ValueError, match="do not fit the run's model .*depth: 3 vs 1.*train.grow_depth=true"):
        train(_config(tiny_musdb, *deeper), tmp_path / "run3")
    two = save_model(build_model(_config(tiny_musdb, "model.depth=2").model), tmp_path / "two_layers.safetensors")
    with pytest.raises(ValueError, match="has 1 layers, fewer than the 2"):
        train(_config(tiny_musdb, f"train.init_from={two}", "train.grow_depth=true"), tmp_path / "run4")
    with pytest.raises(ValueError, match="train.grow_depth=true needs train.init_from"):
        train(_config(tiny_musdb, "train.grow_depth=true"), tmp_path / "run5")


def test_silence_term_trains_and_is_logged(tiny_musdb, tmp_path, caplog):
    """train.silence_weight > 0 adds the silent-region leakage to the loss: the trainer hands the loss the mixture,
    and validation logs the leakage in dB beside uSDR (history and log line)."""
    with caplog.at_level("INFO", logger="bsmamba2.train"):
        result = train(_config(tiny_musdb, "train.silence_weight=0.05", "train.max_steps=1"), tmp_path / "run")
    assert result.step == 1
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert "val_leakage_db" in history[0] and math.isfinite(history[0]["val_loss"])
    assert "silent-region leakage" in caplog.text
    assert load_checkpoint(tmp_path / "run" / "last.pt")["config"]["train"]["silence_weight"] == 0.05


def test_cli_init_from(tiny_musdb, tmp_path, caplog):
    """`bsmamba2 train --init-from MODEL` fine-tunes (the bundled demo model is refused by the tiny config, naming
    the settings); with --resume it is refused, since the run's own last.pt holds its weights."""
    start = tmp_path / "start.safetensors"
    config = _config(tiny_musdb)
    save_model(build_model(config.model), start)
    args = ["train", "--config", "tiny", "--data", str(tiny_musdb), "--out", str(tmp_path / "run")]
    sets = [x for o in [*TEST_OVERRIDES, "train.max_steps=1"] for x in ("--set", o)]
    assert cli.main([*args, *sets, "--init-from", str(start)]) == 0
    assert load_run_config(str(tmp_path / "run" / "config.yaml")).train.init_from == str(start)
    assert cli.main([*args, *sets, "--resume", "--init-from", str(start)]) == 1
    assert "pass one of them" in caplog.text
    demo = tmp_path / "demo-run"
    if (Path(cli.__file__).parent / "assets" / "demo-bsmamba2-synthetic.safetensors").is_file():
        caplog.clear()
        assert cli.main(["train", "--config", "tiny", "--data", str(tiny_musdb), "--out", str(demo), *sets,
                         "--init-from", "demo"]) == 1
        assert "do not fit" in caplog.text and "dim: 16 vs 64" in caplog.text


def test_checkpointing_setting_is_checked_and_auto_is_none_on_cpu(tmp_path, caplog):
    import contextlib

    from bsmamba2.losses import SeparationLoss
    from bsmamba2.build import build_model
    from bsmamba2.train import Dist, _choose_checkpointing

    with pytest.raises(ValueError, match="expected auto, true or false"):
        train(_config(tmp_path, "train.activation_checkpointing=some"), tmp_path / "run")
    with pytest.raises(ValueError, match="train.memory_margin"):
        train(_config(tmp_path, "train.memory_margin=1.5"), tmp_path / "run")
    with pytest.raises(ValueError, match="final_lr_fraction"):  # checked before anything is built
        train(_config(tmp_path, "train.decay_steps=10", "train.final_lr_fraction=2.0"), tmp_path / "run")
    config = _config(tmp_path)
    model = build_model(config.model)
    model.activation_checkpointing = True
    optimizer = torch.optim.AdamW(model.parameters())
    with caplog.at_level("INFO", logger="bsmamba2.train"):
        _choose_checkpointing(model, optimizer, SeparationLoss(), config, Dist(), contextlib.nullcontext)
    assert model.activation_checkpointing is False
    assert "activation checkpointing (auto): none on cpu" in caplog.text


def test_train_step_accumulation_and_checkpointing_match_one_batch():
    """Two micro-batches of 1 with accumulation = one batch of 2; activation checkpointing changes memory only."""
    import contextlib

    from bsmamba2.config import BSMamba2Config
    from bsmamba2.losses import SeparationLoss
    from bsmamba2.build import build_model
    from bsmamba2.train import WaveformModel, train_step

    torch.manual_seed(0)
    mix = 0.1 * torch.randn(2, 2, 8000)
    tgt = 0.05 * torch.randn(2, 1, 2, 8000)
    results = []
    for accum, checkpointing in ((1, False), (2, False), (1, True)):
        torch.manual_seed(1)
        model = build_model(BSMamba2Config.tiny(mask_estimator_depth=1)).train()
        model.activation_checkpointing = checkpointing
        opt = torch.optim.SGD(model.parameters(), lr=0.1)  # weight change = -0.1 × clipped gradient
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        batches = [(mix, tgt)] if accum == 1 else [(mix[:1], tgt[:1]), (mix[1:], tgt[1:])]
        stats = train_step(WaveformModel(model), model, batches, accum, SeparationLoss(), opt, scaler, EMA(model),
                           contextlib.nullcontext, grad_clip=3.0)
        results.append((stats, model.state_dict()))
    (s1, w1), (s2, w2), (s3, w3) = results
    assert s1["loss"] == pytest.approx(s2["loss"], rel=1e-5) and s1["grad_norm"] == pytest.approx(s2["grad_norm"], rel=1e-4)
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-7, rtol=1e-5), k
        assert torch.allclose(w1[k], w3[k], atol=1e-7, rtol=1e-5), k
