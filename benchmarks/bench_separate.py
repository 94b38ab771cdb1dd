"""Separation benchmarks: real-time factor, and peak memory (RSS) while streaming a long file.

    # real-time factor of the paper-size model with the default settings (8-s segments, 50% overlap, batch 4)
    python benchmarks/bench_separate.py rtf --model paper --seconds 16
    python benchmarks/bench_separate.py rtf --model paper --seconds 64 --device cuda --precision bf16   # on a GPU

    # peak RSS of `Separator.separate_file` on a generated N-minute stereo file, in a fresh process
    python benchmarks/bench_separate.py memory --minutes 10 --model tiny
    python benchmarks/bench_separate.py memory --minutes 60 --model tiny --mode paper

Models: "paper" = BSMamba2Config() (48.1 M parameters, random weights: speed does not depend on them), "tiny" =
BSMamba2Config.tiny(), "passthrough" = no model (the streaming pipeline alone), "official-tiny" = the shared official-format test checkpoint, or a checkpoint path. Each run
prints one human line and one JSON line (prefixed `RESULT `) for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import device_label, make_model, music_like, stamp, write_long_file


# -- real-time factor ------------------------------------------------------------------------------------------------
def bench_rtf(args) -> dict:
    import torch

    from bsmamba2.separate import Separator

    if args.threads:
        torch.set_num_threads(args.threads)
    model = make_model(args.model)
    sep = Separator(model, device=args.device, precision=args.precision, segment=args.segment, overlap=args.overlap,
                    batch_size=args.batch_size, mode=args.mode)  # fmt: skip
    wave = torch.from_numpy(music_like(args.seconds))
    # Warm-up on the same input (allocations, kernel selection, Triton compilation for every batch shape it makes).
    if not args.no_warmup:
        sep.separate(wave, 44100)
    times = []
    for _ in range(args.repeat):
        if sep.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = sep.separate(wave, 44100)
        if sep.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    assert out["vocals"].shape == wave.shape
    best = min(times)
    # Segments run for this input; a long song needs segment/hop segments per segment of audio, so its real-time
    # factor is (time per segment) / hop.
    seg, hop, total = sep.segment_samples, sep.hop_samples, wave.shape[-1]
    n_segments = 1 if not seg or total <= seg else 1 + math.ceil((total - seg) / hop)
    per_segment = best / n_segments
    long_rtf = per_segment / (hop / 44100) if seg else best / args.seconds
    n_params = sum(p.numel() for p in model.parameters())
    result = {
        "bench": "rtf", "model": args.model, "params": n_params, "device": device_label(sep.device),
        "precision": str(sep.dtype).replace("torch.", ""), "mode": args.mode, "segment_s": args.segment,
        "overlap": sep.overlap, "batch_size": args.batch_size, "audio_s": args.seconds,
        "seconds_taken": round(best, 3), "rtf": round(best / args.seconds, 4),
        "audio_s_per_s": round(args.seconds / best, 3), "repeats": [round(t, 3) for t in times],
        "segments": n_segments, "seconds_per_segment": round(per_segment, 3), "rtf_long_song": round(long_rtf, 4),
    }  # fmt: skip
    if sep.device.type == "cuda":
        result["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if args.profile:
        result["model_alone_s_per_segment"] = round(_model_alone(sep, wave, args.repeat), 4)
        _profile_once(sep, wave)
    print(f"{args.model} ({n_params / 1e6:.1f} M params) on {result['device']}, {result['precision']}, "
          f"{args.mode} segment {args.segment} s overlap {sep.overlap} batch {args.batch_size}: "
          f"{args.seconds} s of audio in {best:.2f} s -> real-time factor {best / args.seconds:.3f} "
          f"({args.seconds / best:.2f} audio-s/s); {n_segments} segments, {per_segment:.2f} s each -> "
          f"real-time factor on a long song {long_rtf:.3f}")  # fmt: skip
    return result


def _model_alone(sep, wave, repeat: int) -> float:
    """Seconds per segment of the model call alone (`Separator._apply`: transfer, model, copy back) at full batches."""
    import torch

    seg = sep.segment_samples or wave.shape[-1]
    x = torch.stack([wave[:, :seg]] * sep.batch_size)  # (batch, channels, segment)
    sep._apply(x)
    best = float("inf")
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        sep._apply(x)  # returns a CPU tensor, so the GPU work is finished
        best = min(best, time.perf_counter() - start)
    return best / sep.batch_size


def _profile_once(sep, wave) -> None:
    """Where one `separate` call spends its host time: the top functions by cumulative time (cProfile)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    sep.separate(wave, 44100)
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


# -- streaming memory ------------------------------------------------------------------------------------------------
def memory_child(args) -> None:
    """The measured process of `memory` (run by it as `bench_separate.py memory-child`): load the model, separate
    the file, print one JSON line with the peak RSS along the file."""
    import torch

    from bsmamba2.separate import Separator

    torch.set_num_threads(args.threads or 2)
    model = make_model(args.model)
    sep = Separator(model, device="cpu", segment=args.segment, overlap=args.overlap, batch_size=args.batch_size,
                    mode=args.mode)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    done = [0.0]
    samples = []  # (audio minutes done, peak RSS so far in MiB)

    def progress(sec):
        done[0] += sec
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if not samples or done[0] / 60 - samples[-1][0] >= args.minutes / 10:
            samples.append((round(done[0] / 60, 2), round(peak)))

    start = time.perf_counter()
    res = sep.separate_file_result(args.src, args.dest, progress=progress)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(base_kib=base, peak_kib=peak, elapsed=elapsed, duration=res.duration, samples=samples,
                          outputs={k: str(v) for k, v in res.outputs.items()})))


def bench_memory(args) -> dict:
    import soundfile as sf

    with tempfile.TemporaryDirectory(prefix="bsmamba2-mem-", dir=args.tmp) as tmp:
        src = Path(tmp) / f"long_{args.minutes:g}min.wav"
        t0 = time.perf_counter()
        write_long_file(src, args.minutes)
        print(f"wrote {src} ({src.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s", flush=True)
        child_args = ["memory-child", "--model", args.model, "--segment", str(args.segment), "--overlap",
                      str(args.overlap), "--batch-size", str(args.batch_size), "--mode", args.mode, "--threads",
                      str(args.threads or 2), "--minutes", str(args.minutes), "--src", str(src), "--dest",
                      str(Path(tmp) / "out")]  # fmt: skip
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *child_args], capture_output=True,
                              text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"child failed with exit code {proc.returncode}")
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        frames_in = sf.info(str(src)).frames
        lengths = {k: sf.info(v).frames for k, v in child["outputs"].items()}
        assert all(n == frames_in for n in lengths.values()), (frames_in, lengths)
    peak_gib = child["peak_kib"] / 2**20
    result = {
        "bench": "memory", "model": args.model, "minutes": args.minutes, "mode": args.mode, "segment_s": args.segment,
        "overlap": args.overlap if args.mode != "paper" else 0.0, "batch_size": args.batch_size,
        "peak_rss_gib": round(peak_gib, 3), "rss_after_model_load_gib": round(child["base_kib"] / 2**20, 3),
        "seconds_taken": round(child["elapsed"], 1), "rtf": round(child["elapsed"] / child["duration"], 4),
        "file_mib": round(frames_in * 4 / 2**20), "device": f"CPU, {args.threads or 2} threads",
        "peak_rss_mib_along_file": child["samples"],
    }  # fmt: skip
    print(f"{args.minutes:g}-minute stereo file ({result['file_mib']} MiB PCM16), model {args.model}, {args.mode}: "
          f"peak RSS {peak_gib:.2f} GiB (after model load {result['rss_after_model_load_gib']:.2f} GiB), "
          f"{child['elapsed']:.0f} s, real-time factor {result['rtf']:.3f}; outputs complete")  # fmt: skip
    print("peak RSS so far (audio minutes done, MiB): " + ", ".join(f"{m:g} min {r}" for m, r in child["samples"]))
    if args.limit_gib and peak_gib > args.limit_gib:
        print(f"FAIL: peak RSS {peak_gib:.2f} GiB is above the {args.limit_gib} GiB limit")
        result["fail"] = True
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench", required=True)
    for name in ("rtf", "memory", "memory-child"):
        s = sub.add_parser(name, help=argparse.SUPPRESS) if name == "memory-child" else sub.add_parser(name)
        s.add_argument("--model", default="paper" if name == "rtf" else "tiny")
        s.add_argument("--segment", type=float, default=8.0)
        s.add_argument("--overlap", type=float, default=0.5)
        s.add_argument("--batch-size", type=int, default=4)
        s.add_argument("--mode", default="overlap-add", choices=("overlap-add", "paper"))
        s.add_argument("--threads", type=int, default=None)
    r = sub.choices["rtf"]
    r.add_argument("--seconds", type=float, default=16.0, help="input length (16 s = 4 segments at the defaults)")
    r.add_argument("--device", default="auto")
    r.add_argument("--precision", default=None)
    r.add_argument("--repeat", type=int, default=1)
    r.add_argument("--no-warmup", action="store_true", help="skip the untimed first call (slow CPU models)")
    r.add_argument("--profile", action="store_true",
                   help="also time the model call alone and print a cProfile of one more call")
    m = sub.choices["memory"]
    m.add_argument("--minutes", type=float, default=10.0)
    m.add_argument("--tmp", default=None, help="folder for the generated file and outputs (needs ~3x the file size)")
    m.add_argument("--limit-gib", type=float, default=2.0, help="report FAIL above this peak RSS")
    c = sub.choices["memory-child"]
    c.add_argument("--minutes", type=float, required=True)
    c.add_argument("--src", required=True)
    c.add_argument("--dest", required=True)
    args = p.parse_args()
    if args.bench == "memory-child":
        memory_child(args)
        return
    result = bench_rtf(args) if args.bench == "rtf" else bench_memory(args)
    result.update({k: v for k, v in stamp().items() if k not in result})
    print("RESULT " + json.dumps(result))
    if result.get("fail"):
        sys.exit(1)


if __name__ == "__main__":
    main()
