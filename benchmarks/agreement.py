"""Agreement with the official BSMamba2 code: this package's model, loaded from the shared official-format checkpoint
(`official_tiny_a.ckpt`), against the official model's outputs stored beside it (`official_tiny_a_io.npz`), as the
relative error ‖ours − official‖ / ‖official‖ of the masked spectrum and of the waveform (float32).

    PYTHONPATH=src python benchmarks/agreement.py                  # CPU, plain PyTorch
    PYTHONPATH=src python benchmarks/agreement.py --device cuda    # the fast path (Triton/Gluon kernels), TF32 off

The fixture lives in the project's shared folder ($BSMAMBA2_SHARED, default ../shared); the tests assert ≤ 1e-4.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from common import print_stamp, rel_error, shared_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args()
    from bsmamba2.checkpoint import load_model

    folder = shared_dir() / "fixtures" / "official"
    if not (folder / "official_tiny_a_io.npz").is_file():
        raise SystemExit(f"no official fixture in {folder}: set BSMAMBA2_SHARED to the shared folder")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    stamp = print_stamp(args.device)
    model = load_model(folder / "official_tiny_a.ckpt").to(args.device).eval()
    with np.load(folder / "official_tiny_a_io.npz") as data:
        io = {k: torch.from_numpy(data[k]) for k in data.files}
    with torch.inference_mode():
        spec = model(io["mixture_spec"][None].to(args.device))[0, 0].cpu()
        wave = model.forward_waveform(io["mixture"][None].to(args.device))[0, 0].cpu()
    result = {"spectrum_rel_err": rel_error(spec, io["vocals_spec"]), "waveform_rel_err": rel_error(wave, io["vocals"])}
    print(f"official fixture, {stamp['device']}, float32: spectrum {result['spectrum_rel_err']:.1e}, "
          f"waveform {result['waveform_rel_err']:.1e} relative to the official outputs")
    print("RESULT " + json.dumps({**result, **stamp}))


if __name__ == "__main__":
    main()
