"""Peak memory (RSS) separating a long AAC (m4a) file against the same audio as WAV: FFmpeg decoding through PyAV
must keep the constant-memory bound of streaming separation.

    python benchmarks/bench_decode.py --minutes 60                      # streaming pipeline alone (no model work)
    python benchmarks/bench_decode.py --minutes 2 --model tiny          # with a small real model (slow on a CPU)
    python benchmarks/bench_decode.py --minutes 60 --model paper --device cuda   # the paper-size model on a GPU

It writes an N-minute stereo PCM16 WAV block by block (`common.write_long_file`), encodes the same audio
to AAC in m4a with bsmamba2's own writer (PyAV, 256 kbit/s), then, each in a fresh process so that peak RSS belongs
to that run alone (on Linux the peak is reset after imports and model load, so it is the work's own peak, and
"before" is the RSS at that point): decodes each file through `AudioReader`, and separates each file with
`Separator.separate_file` to wav. Outputs are checked to have the input's decoded length. Models as in
bench_separate.py ("passthrough" = no model work: the read, chunk, blend and write pipeline alone). Prints one
human line per run and one JSON line (prefixed `RESULT `) for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_long_file

_CHILD = r"""
import json, resource, sys, time
import torch
def reset_peak():
    # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM), so imports' transients do not hide the work's
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
def rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
sys.path.insert(0, {bench_dir!r})
from common import make_model
from bsmamba2.audio import AudioReader, audio_info
from bsmamba2.separate import Separator
torch.set_num_threads({threads})
start = time.perf_counter()
if {task!r} == "decode":
    reset = reset_peak()
    base = rss_kib("VmRSS")
    frames = 0
    with AudioReader({src!r}) as reader:
        for block in reader:
            frames += block.shape[-1]
    result = dict(frames=frames)
else:
    model = make_model({model!r})
    sep = Separator(model, device={device!r}, segment={segment}, overlap={overlap}, batch_size={batch})
    reset = reset_peak()
    base = rss_kib("VmRSS")
    start = time.perf_counter()
    res = sep.separate_file_result({src!r}, {out!r})
    result = dict(frames=round(res.duration * res.sample_rate),
                  outputs={{k: audio_info(v).frames for k, v in res.outputs.items()}})
elapsed = time.perf_counter() - start
peak = rss_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(result, base_kib=base, peak_kib=peak, elapsed=elapsed, peak_reset=reset)))
"""


def encode_m4a(src: Path, dest: Path, bitrate: int = 256) -> None:
    """The WAV re-encoded as AAC in m4a, block by block, with bsmamba2's writer."""
    from bsmamba2.audio import AudioReader, AudioWriter

    with AudioReader(src) as reader, AudioWriter(dest, reader.sample_rate, reader.channels, bitrate=bitrate) as w:
        for block in reader:
            w.write(block)


def run_child(args, task: str, src: Path, out: Path) -> dict:
    code = _CHILD.format(
        bench_dir=str(Path(__file__).parent), threads=args.threads, task=task, src=str(src), out=str(out),
        model=args.model, device=args.device, segment=args.segment, overlap=args.overlap, batch=args.batch_size,
    )  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{task} of {src.name} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--model", default="passthrough", help="passthrough (default), tiny, paper, official-tiny or a path")
    p.add_argument("--device", default="cpu")
    p.add_argument("--segment", type=float, default=8.0)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tmp", default=None, help="folder for the generated files (default: the system's temp)")
    p.add_argument("--skip-separate", action="store_true", help="measure decoding only")
    args = p.parse_args()

    results = []
    with tempfile.TemporaryDirectory(prefix="bsmamba2-decode-", dir=args.tmp) as tmp:
        wav, m4a = Path(tmp) / "long.wav", Path(tmp) / "long.m4a"
        t0 = time.perf_counter()
        write_long_file(wav, args.minutes)
        t1 = time.perf_counter()
        encode_m4a(wav, m4a)
        print(f"{args.minutes:g} min: wav {wav.stat().st_size / 2**20:.0f} MiB ({t1 - t0:.0f} s), m4a "
              f"{m4a.stat().st_size / 2**20:.0f} MiB (encoded in {time.perf_counter() - t1:.0f} s)", flush=True)
        tasks = ["decode"] + ([] if args.skip_separate else ["separate"])
        frames = {}
        for task in tasks:
            for src in (wav, m4a):
                child = run_child(args, task, src, Path(tmp) / f"out-{src.suffix[1:]}")
                frames.setdefault(src.suffix, child["frames"])
                assert child["frames"] == frames[src.suffix], (task, src, child["frames"], frames)
                for stem, n in child.get("outputs", {}).items():
                    assert n == child["frames"], (src, stem, n, child["frames"])
                r = {
                    "bench": "decode", "task": task, "input": src.suffix[1:], "minutes": args.minutes,
                    "model": args.model if task == "separate" else None, "frames": child["frames"],
                    "peak_rss_mib": round(child["peak_kib"] / 1024), "rss_before_mib": round(child["base_kib"] / 1024),
                    "seconds": round(child["elapsed"], 1),
                    "x_realtime": round(child["frames"] / 44100 / child["elapsed"], 1),
                    "device": f"{args.device}, {args.threads} threads",
                }  # fmt: skip
                results.append(r)
                print(f"{task:>8} {src.suffix[1:]:>4}: peak RSS {r['peak_rss_mib']} MiB (before: "
                      f"{r['rss_before_mib']} MiB), {r['seconds']} s, {r['x_realtime']}x real time", flush=True)
        # AAC decodes to the WAV's length exactly (priming and padding dropped)
        print(f"decoded lengths: wav {frames['.wav']}, m4a {frames['.m4a']} samples"
              + (" (equal)" if frames[".wav"] == frames[".m4a"] else " (DIFFERENT)"))
    for r in results:
        print("RESULT " + json.dumps(r))


if __name__ == "__main__":
    main()
