"""The catalog engine (`bsmamba2.catalog`): torchrun with 3 CPU processes against a plain one-process
`bsmamba2 separate`, a SIGKILLed process and the rerun, a corrupt file, and the pooling of segments into model calls.

The model is a micro BSMamba2 (dim 8, 13 bands over a 256-point STFT at 4 kHz) so that a 3-minute file takes a
few CPU seconds; inputs are resampled to and from its rate like any other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from bsmamba2 import catalog
from bsmamba2.checkpoint import save_model
from bsmamba2.cli import main
from bsmamba2.config import BSMamba2Config, STFTConfig
from bsmamba2.build import build_model
from bsmamba2.separate import MANIFEST_NAME, Manifest, Separator

ROOT = Path(__file__).resolve().parents[1]
MICRO = dict(dim=8, band_widths=(8,) * 8 + (16,) * 4 + (1,),
             stft=STFTConfig(sample_rate=4000, n_fft=256, hop_length=128))
OPTIONS = ["--segment", "2", "--batch-size", "4", "--device", "cpu"]
# name, sample rate, channels, seconds: four formats, four files under one 2-s segment, one of 3 minutes at 2 kHz
LIBRARY = [
    ("long.flac", 2000, 1, 180.0), ("a.wav", 8000, 2, 0.3), ("b.ogg", 22050, 1, 0.6), ("c.wav", 44100, 2, 0.05),
    ("d.mp3", 44100, 2, 3.0), ("e.mp3", 48000, 1, 2.0), ("f.flac", 16000, 2, 4.0), ("g.flac", 4000, 2, 2.5),
    ("h.ogg", 44100, 2, 5.0), ("i.wav", 4000, 2, 7.3), ("j.wav", 32000, 1, 1.7),
]  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread, as torchrun gives each process: on a busy 2-core machine two threads spin-wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def micro_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "micro.safetensors"
    return save_model(build_model(BSMamba2Config.tiny(**MICRO)).eval(), path)


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    """good/: the files of LIBRARY (tones and noise); bad/broken.mp3: random bytes."""
    root = tmp_path_factory.mktemp("library")
    rng = np.random.default_rng(0)
    (root / "good").mkdir()
    for name, sr, channels, seconds in LIBRARY:
        t = np.arange(int(sr * seconds)) / sr
        tone = 0.2 * np.sin(2 * np.pi * (110 + 40 * rng.random()) * t)[:, None]
        wave = tone + 0.05 * rng.standard_normal((t.size, channels))
        sf.write(str(root / "good" / name), wave.astype(np.float32), sr)
    (root / "bad").mkdir()
    (root / "bad" / "broken.mp3").write_bytes(rng.bytes(5000))
    return root


@pytest.fixture(scope="module")
def reference(library, micro_ckpt, tmp_path_factory) -> Path:
    """Outputs of a plain one-process `bsmamba2 separate` of good/."""
    out = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the autouse one
    try:
        assert main(["separate", str(library / "good"), "-o", str(out), "-c", str(micro_ckpt), *OPTIONS, "-q", "--compile", "off"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def outputs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.wav"))}


def torchrun(args: list[str], extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc-per-node 3 -m bsmamba2 separate ARGS` (gloo-free, CPU)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "BSMAMBA2_CPU_COMPILE": "off"}  # fmt: skip  (bit identity: eager, as the reference)
    env.pop(catalog.TEST_KILL_ENV, None)
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
           "-m", "bsmamba2", "separate", *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_rows_do_not_depend_on_the_rest_of_the_call(micro_ckpt):
    """The premise of pooling files into one call, bit for bit on CPU fp32: a row's result is the same alone, at
    another position, or next to other rows (including the zero rows that pad short calls)."""
    sep = Separator(micro_ckpt, device="cpu", segment=2.0)
    x = 0.1 * torch.randn(4, 2, sep.segment_samples)
    full = sep.apply_on_device(x)
    for i in range(4):
        assert torch.equal(sep.apply_on_device(x[i : i + 1])[0], full[i])
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.equal(sep.apply_on_device(x[perm]), full[perm])
    padded = torch.cat([x[:1], torch.zeros(3, *x.shape[1:])])
    assert torch.equal(sep.apply_on_device(padded)[0], full[0])


class _Recorder(nn.Module):
    """A real model module (twice the input as its one stem) that records how many rows each call has."""

    stems, audio_channels, sample_rate = ("vocals",), 2, 4000

    def __init__(self):
        super().__init__()
        self.calls: list[int] = []

    def forward_waveform(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return (x * 2.0)[:, None]  # (b, 1, c, t)


def test_batcher_pools_calls_of_many_files_into_full_model_calls():
    model = _Recorder()
    sep = Separator(model, device="cpu", segment=0.5, batch_size=4)
    batcher = catalog.Batcher(sep)
    seg = sep.segment_samples
    inputs = {w: [torch.randn(n, 2, seg) for n in (1, 3, 2)] for w in range(5)}  # 5 "files", calls of 1-3 rows
    inputs[5] = [torch.randn(1, 1, seg)]  # a mono file's one row: a shape of its own, padded once it waited
    results: dict[int, list[torch.Tensor]] = {}

    def worker(w: int) -> None:
        try:
            results[w] = [batcher.call(x) for x in inputs[w]]
        finally:
            batcher.leave()

    threads = [threading.Thread(target=worker, args=(w,)) for w in inputs]
    for t in threads:
        batcher.enter()
    for t in threads:
        t.start()
    batcher.run()
    for t in threads:
        t.join()
    for w, xs in inputs.items():
        for x, y in zip(xs, results[w]):
            assert torch.equal(y, (x * 2.0)[:, None])  # each worker gets its own rows back, in order
    assert set(model.calls) == {4}  # every call full-sized: short ones padded with zero rows
    stats = batcher.stats
    assert stats.rows == 31 and stats.calls * 4 == stats.rows + stats.pad_rows and stats.calls < 16


def test_merge_shards_survives_a_torn_line_and_counts_attempts(tmp_path):
    shard = catalog.Shard(tmp_path, "20260101T000000-aaaaaa", 0)
    key = str((tmp_path / "x.wav").resolve())
    shard.write(key, status="running", rank=0)
    shard.write(key, status="done", outputs={"vocals": "v.wav"})
    shard.close()
    later = catalog.Shard(tmp_path, "20260101T000001-bbbbbb", 1)
    later.write(key, status="running", rank=1)
    later.close()
    with open(later.path, "a") as f:
        f.write('{"key": "' + key + '", "status": "do')  # a process killed mid-write
    assert catalog.merge_shards(tmp_path) == 3
    entry = Manifest(tmp_path).files[key]
    assert entry == {"status": "running", "rank": 1, "attempts": 2}  # the second attempt replaced the first
    assert not (tmp_path / catalog.SHARD_DIR).exists()


def test_torchrun_three_processes_kill_one_then_rerun(library, micro_ckpt, reference, tmp_path):
    """Run 1: the process separating the 3-minute file SIGKILLs itself mid-file once 3 files are done -> the job
    fails, no partial output. Run 2, the same command: only the unfinished files run, each once; every output is
    byte-identical to the plain run; the corrupt file is recorded as failed; one manifest."""
    out = tmp_path / "out"
    args = [str(library), "-o", str(out), "-c", str(micro_ckpt), *OPTIONS, "--progress", "json"]
    first = torchrun(args, {catalog.TEST_KILL_ENV: "3"})
    assert first.returncode != 0, first.stderr[-3000:]
    assert "kills itself mid-file" in first.stderr
    expected = outputs(reference)
    written = outputs(out)
    assert written and all(expected[name] == data for name, data in written.items())  # complete files only

    catalog.merge_shards(out)  # what the rerun does first; read the state the killed job left
    after_kill = Manifest(out).files
    done = {k for k, e in after_kill.items() if e["status"] == "done"}
    good = {str((library / "good" / name).resolve()) for name, *_ in LIBRARY}
    broken = str((library / "bad" / "broken.mp3").resolve())
    assert len(done) >= 3 and str((library / "good" / "long.flac").resolve()) not in done
    # torchrun stopped the other ranks with SIGTERM: they aborted their files (no temporary output left) and exited
    # without needing the SIGKILL that follows 30 s later
    assert "forcefully exiting" not in first.stderr
    for key, entry in after_kill.items():
        if entry["status"] == "interrupted":
            assert not list((out / Path(key).stem).glob(".*.part")), key

    second = torchrun(args)
    assert second.returncode == 1, second.stderr[-3000:]  # the corrupt file failed
    summary = json_lines(second.stdout)[-1]
    assert summary["event"] == "summary"
    assert (summary["ok"], summary["failed"], summary["skipped"]) == (len(good - done), 1, len(done))
    assert summary["world"] == 3 and summary["files_total"] == len(LIBRARY) + 1
    assert outputs(out) == expected
    manifest = json.loads((out / MANIFEST_NAME).read_text())["files"]
    assert set(manifest) == good | {broken}
    rerun_jobs = {manifest[k]["job"] for k in good - done}
    assert len(rerun_jobs) == 1 and rerun_jobs != {after_kill[k]["job"] for k in done}
    for key in done:  # finished by the killed job: not touched again
        assert manifest[key] == after_kill[key]
    for key in (good - done) | {broken}:  # each started exactly once more
        assert manifest[key]["attempts"] == after_kill.get(key, {}).get("attempts", 0) + 1
    for key in good:
        entry = manifest[key]
        assert entry["status"] == "done" and entry["rank"] in (0, 1, 2) and entry["host"]
        assert set(entry["output_sha256"]) == {"vocals", "instrumental"} and entry["input_sha256"]
    assert manifest[broken]["status"] == "failed" and "broken.mp3" in manifest[broken]["error"]
    assert not list(out.rglob("*.part")) and not (out / catalog.SHARD_DIR).exists()
    assert [p.name for p in out.glob("*.json")] == [MANIFEST_NAME]


def test_one_process_catalog_resumes_a_plain_run(library, micro_ckpt, reference, tmp_path, capsys):
    """`--progress json` runs the engine in one process; a plain run's manifest counts: nothing is redone."""
    out = tmp_path / "out"
    out.mkdir()
    for name in [*outputs(reference), MANIFEST_NAME]:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes((reference / name).read_bytes())
    args = [str(library / "good"), "-o", str(out), "-c", str(micro_ckpt), *OPTIONS, "--progress", "json"]
    assert main(["separate", *args]) == 0
    lines = json_lines(capsys.readouterr().out)
    assert lines[-1]["event"] == "summary" and lines[-1]["skipped"] == len(LIBRARY) and lines[-1]["ok"] == 0
    assert outputs(out) == outputs(reference)


@pytest.mark.gpu
def test_cuda_catalog_equals_a_plain_run_whatever_the_packing(library, micro_ckpt, tmp_path):
    """On a GPU (fp32): pinned buffers and two calls in flight change nothing; one worker or four (other files
    sharing each call) give the same bytes as a plain run on the same GPU."""
    files = sorted((library / "good").iterdir())
    plain = tmp_path / "plain"
    assert main(["separate", str(library / "good"), "-o", str(plain), "-c", str(micro_ckpt), "--segment", "2",
                 "--batch-size", "4", "--device", "cuda", "-q"]) == 0  # fmt: skip
    sep = Separator(micro_ckpt, device="cuda", segment=2.0, batch_size=4)
    for workers in (1, 4):
        out = tmp_path / f"catalog{workers}"
        options = catalog.Options(out_dir=out, settings=sep.settings(), template="{track}/{stem}.{ext}")
        report = catalog.separate_catalog(sep, files, options, workers=workers, progress="none")
        assert report.ok == len(files) and report.failed == 0
        assert outputs(out) == outputs(plain)
