"""CPU time of separating of candidate demo-model sizes on a 20-s stereo song (float32, no grad).

    PYTHONPATH=src python experiments/demo_model/time_model.py 96x4 64x4 64x6 [--seconds 20] [--threads 2]

Prints parameters, fp16 size and the best of `--repeats` wall and process-CPU times per size (on a shared machine
the CPU time is the steadier number: wall on an idle 2-core machine is about CPU / 2 when both threads keep busy), and the synthesis time of the
demo song, so the `bsmamba2 demo` budget can be split before training a model of that size.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bsmamba2.config import BSMamba2Config
from bsmamba2.checkpoint import save_model
from bsmamba2.build import build_model
from bsmamba2.separate import Separator


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("sizes", nargs="+", help="DIMxDEPTH, e.g. 96x4")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--segment", type=float, default=0.0, help="Separator segment, s (0: the whole song at once)")
    p.add_argument("--overlap", type=float, default=0.0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from bsmamba2.data.synth import generate_song

    t, c = time.perf_counter(), time.process_time()
    generate_song(2025, args.seconds, "sparse")
    print(f"synthesize the {args.seconds:.0f}-s demo song: {time.perf_counter() - t:.2f} s wall, "
          f"{time.process_time() - c:.2f} s CPU", flush=True)
    x = torch.randn(2, int(args.seconds * 44100)) * 0.1
    for size in args.sizes:
        dim, depth = (int(v) for v in size.split("x"))
        cfg = BSMamba2Config(dim=dim, depth=depth, stems=("vocals",))
        model = build_model(cfg).eval()
        n = sum(q.numel() for q in model.parameters())
        with tempfile.TemporaryDirectory() as tmp:
            path = save_model(model, Path(tmp) / "m.safetensors", dtype=torch.float16)
            sep = Separator(path, device="cpu", segment=args.segment, overlap=args.overlap)
            best, cpu = float("inf"), float("inf")
            for _ in range(args.repeats):
                t, c = time.perf_counter(), time.process_time()
                sep.separate(x, 44100)
                best, cpu = min(best, time.perf_counter() - t), min(cpu, time.process_time() - c)
        print(f"D={dim} L={depth}: {n / 1e6:.2f} M params, {2 * n / 1e6:.1f} MB fp16, "
              f"separate {args.seconds:.0f} s (segment {args.segment}, overlap {args.overlap}): "
              f"{best:.2f} s wall, {cpu:.2f} s CPU ({cpu / args.seconds:.3f} CPU-s per audio-s)", flush=True)


if __name__ == "__main__":
    main()
