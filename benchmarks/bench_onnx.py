"""The CPU candidates side by side: PyTorch eager, PyTorch compiled (`torch.compile`), ONNX Runtime and OpenVINO, fp32
and int8 (PyTorch also bf16 projections, `bsmamba2.quantize.linear_bf16`), for the bundled model and the paper-size
model, with the fp32 matmul floor measured in the same process; and the SDR cost of int8 and bf16 on the shared real
track and on synthetic sparse songs.

Speed: one 8-s stereo chunk (batch 1) through `forward_waveform` (STFT + network + iSTFT) per measurement. The floor
is the network's matmul FLOPs at the rate of a 2048³ fp32 matmul timed in the same process right before each
measurement (the CPU is shared, so the rate moves with the load): 3.28 TFLOP per 8-s chunk for the paper
size (0.41 TFLOP per audio-second), counted with `torch.utils.flop_counter` for the bundled model. The paper-size
model has seeded random weights (speed does not depend on them). Exports come from the ONNX cache of
`bsmamba2.onnx_backend` (`$BSMAMBA2_CACHE/onnx`), made on the first run (minutes each; timed and reported); both
ONNX runtimes run the same files; the reported set-up time is the export (first run) and the runtime's load. On a 24-GB
machine the paper-size model does not fit onnxruntime and OpenVINO (fp32 and int8 each) in one process: pass
`--backends` with one of them.

Quality: `Separator` with its defaults (8-s segments, overlap 0.5) at fp32 and int8 (torch also bf16), torch and the
ONNX runtimes in `--backends`, bundled model;
uSDR of the vocals against the reference on "Music Delta - 80s Rock" (shared/, 6.8 s) and on `--songs` synthetic
sparse-vocal songs (`generate_song((7, 1, i), vocal_activity="sparse")`, as `bsmamba2 synth --seed 7`).

    python benchmarks/bench_onnx.py [--models small paper] [--backends torch,compiled,onnxruntime,openvino]
                                    [--pairs 2] [--threads 2] [--songs 3] [--song-seconds 12] [--skip-sdr]
                                    [--json rows.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from bsmamba2 import cpu_compile
from bsmamba2 import onnx_backend as ob
from bsmamba2.config import BSMamba2Config
from bsmamba2.model import BSMamba2
from bsmamba2.quantize import linear_bf16, quantize_linear_int8
from bsmamba2.pretrained import load_model
from bsmamba2.separate import Separator, _module_sha256

PAPER_TFLOP_PER_CHUNK = 3.28  # the count for the paper-size network on one 8-s stereo chunk
SR = 44100
SHARED = Path(os.environ.get("BSMAMBA2_SHARED", Path(__file__).resolve().parents[2] / "shared"))
TRACK = SHARED / "data" / "musdb18hq-sample" / "train" / "Music Delta - 80s Rock"


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best-of rate of an n³ fp32 matmul on this CPU, GFLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def network_tflop(model, wave) -> float:
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.forward_waveform(wave)
    return counter.get_total_flops() / 1e12


def load(name: str):
    if name == "small":
        return load_model("demo").eval()
    torch.manual_seed(0)
    return BSMamba2(BSMamba2Config()).eval()


def compiled_forward(model):
    """`model.forward_waveform` with its bidirectional blocks compiled (`bsmamba2.cpu_compile`, as
    `Separator(compile="on")` runs it)."""
    def forward(wave):
        with cpu_compile.enabled():
            return model.forward_waveform(wave)
    return forward


def onnx_net(model, precision: str, threads: int, runtime: str = "onnxruntime") -> tuple[ob.OnnxModel, float]:
    """The cached export of `model` for 8-s segments in `runtime`, and the time it took to get it: the export when
    missing (minutes), then the runtime's session or compile (seconds)."""
    t0 = time.perf_counter()
    net, _ = ob.onnx_model(model, 8.0, precision=precision, device="cpu", sha256=_module_sha256, runtime=runtime,
                           threads=threads)
    return net, time.perf_counter() - t0


def speed(args) -> list[dict]:
    gflops = matmul_gflops()
    print(f"matmul floor rate: {gflops:.0f} GFLOP/s (2048^3 fp32, {torch.get_num_threads()} threads)", flush=True)
    rows = []
    wave = 0.1 * torch.randn(1, 2, 8 * SR, generator=torch.Generator().manual_seed(0))
    for name in args.models:
        model = load(name)
        tflop = PAPER_TFLOP_PER_CHUNK if name == "paper" else network_tflop(model, wave)
        floor = tflop * 1e3 / gflops
        nets, export_s = {}, {}
        bf16 = linear_bf16(model)
        runners = {("torch", "fp32"): model.forward_waveform, ("torch", "bf16"): bf16.forward_waveform,
                   ("torch", "int8"): quantize_linear_int8(model).forward_waveform}
        if "compiled" in args.backends:
            for precision, m in (("fp32", model), ("bf16", bf16)):
                runners["compiled", precision] = compiled_forward(m)
                with torch.inference_mode():
                    export_s["compiled", precision] = _timed(lambda: runners["compiled", precision](wave))  # compiles
                print(f"{name}: torch.compile and a first chunk ({precision}) took "
                      f"{export_s['compiled', precision]:.1f} s", flush=True)
        for runtime in (r for r in ob.RUNTIMES if r in args.backends):
            for precision in ("fp32", "int8"):
                nets[runtime, precision], export_s[runtime, precision] = onnx_net(model, precision, args.threads,
                                                                                 runtime)
                runners[runtime, precision] = nets[runtime, precision].forward_waveform
        if name == "small":  # cheap enough to warm every path up once
            with torch.inference_mode():
                for run in runners.values():
                    run(wave)
        # the fp32 and bf16 candidates back to back `--pairs` times, then the int8 ones once
        fp32 = [(b, "fp32") for b in ("torch", "compiled", *ob.RUNTIMES) if b in args.backends]
        fp32 += [(b, "bf16") for b in ("torch", "compiled") if b in args.backends]
        order = fp32 * args.pairs + [(b, "int8") for b in ("torch", *ob.RUNTIMES) if b in args.backends]
        for backend, precision in order:
            # the CPU is shared: the floor's rate is taken again right before each timing, so both see one load
            gflops = matmul_gflops(repeats=3)
            floor = tflop * 1e3 / gflops
            with torch.inference_mode():
                s = _timed(lambda: runners[backend, precision](wave))
            row = {"model": name, "backend": backend, "precision": precision, "s_per_chunk": s, "rtf": s / 8,
                   "floor_s": floor, "x_floor": s / floor, "tflop": tflop, "matmul_gflops": gflops,
                   "export_s": export_s.get((backend, precision))}
            rows.append(row)
            print(f"{name:<6}{backend:<12}{precision:<6}{s:8.2f} s/chunk  RTF {s / 8:5.2f}  {s / floor:5.2f}x floor "
                  f"({floor:.1f} s: {tflop:.3f} TFLOP at {gflops:.0f} GFLOP/s)", flush=True)
        del model, runners, nets
    return rows


def sdr(args) -> list[dict]:
    import numpy as np  # noqa: PLC0415

    from bsmamba2.audio import read_audio  # noqa: PLC0415
    from bsmamba2.data.synth import generate_song  # noqa: PLC0415
    from bsmamba2.metrics import usdr  # noqa: PLC0415

    songs = {"80s Rock (real)": (read_audio(TRACK / "mixture.wav")[0], read_audio(TRACK / "vocals.wav")[0])}
    for i in range(args.songs):
        song = generate_song((7, 1, i), seconds=args.song_seconds, vocal_activity="sparse")
        songs[f"synthetic sparse {i}"] = (torch.from_numpy(song.mixture), torch.from_numpy(song.stems["vocals"]))
    rows = []
    backends = ["torch", *(r for r in ob.RUNTIMES if r in args.backends)]
    for backend in backends:
        for precision in ("fp32", "bf16", "int8") if backend == "torch" else ("fp32", "int8"):
            sep = Separator("demo", device="cpu", precision=precision, backend=backend)
            for name, (mix, ref) in songs.items():
                t0 = time.perf_counter()
                est = sep.separate(mix, SR)["vocals"]
                rows.append({"song": name, "backend": backend, "precision": precision, "usdr": usdr(est, ref),
                             "s": time.perf_counter() - t0, "vocals": est})
    base = {r["song"]: r for r in rows if r["backend"] == "torch" and r["precision"] == "fp32"}
    print(f"\n{'song':<22}{'backend':<12}{'prec':<6}{'uSDR dB':>8}{'Δ vs torch fp32':>17}{'vs torch fp32 (rel)':>21}"
          f"{'s':>7}")
    for r in rows:
        b = base[r["song"]]
        r["delta_db"] = r["usdr"] - b["usdr"]
        r["rel_to_torch_fp32"] = float((r["vocals"] - b["vocals"]).abs().max() / b["vocals"].abs().max())
        print(f"{r['song']:<22}{r['backend']:<12}{r['precision']:<6}{r['usdr']:8.3f}{r['delta_db']:17.3f}"
              f"{r['rel_to_torch_fp32']:21.2e}{r['s']:7.1f}")
    for backend, precision in [(b, p) for b in backends for p in ("bf16", "int8")]:
        deltas = [r["delta_db"] for r in rows if r["backend"] == backend and r["precision"] == precision]
        if deltas:
            print(f"{precision} on {backend}: mean Δ uSDR {np.mean(deltas):+.3f} dB, worst {min(deltas):+.3f} dB "
                  f"(a default only if the cost is <= 0.05 dB)")
    for r in rows:
        del r["vocals"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=("small", "paper"), default=["small", "paper"])
    parser.add_argument("--backends", type=lambda s: s.split(","), default=["torch", "compiled", "onnxruntime"],
                        help="comma-separated subset of torch, compiled (torch.compile), onnxruntime, openvino "
                             "(default: all but openvino)")
    parser.add_argument("--pairs", type=int, default=2, help="rounds of the fp32 candidates back to back (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads (default 2)")
    parser.add_argument("--songs", type=int, default=3, help="synthetic sparse songs for the SDR cost (default 3)")
    parser.add_argument("--song-seconds", type=float, default=12.0)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-sdr", action="store_true")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    import onnxruntime  # noqa: PLC0415

    versions = f"onnxruntime {onnxruntime.__version__}"
    if "openvino" in args.backends:
        import openvino  # noqa: PLC0415

        versions += f", openvino {openvino.__version__}"
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}, torch {torch.__version__}, {versions}, "
          f"C++ compiler {'found' if cpu_compile.compiler_found() else 'not found'}", flush=True)
    out = {"speed": [] if args.skip_speed else speed(args), "sdr": [] if args.skip_sdr else sdr(args),
           "load_average_end": os.getloadavg()[0]}
    print(f"load average at the end: {out['load_average_end']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
