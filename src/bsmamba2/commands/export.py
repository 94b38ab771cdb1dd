"""`bsmamba2 export`: training checkpoint (last.pt / best.pt) → inference model (.safetensors with its config)."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

HELP = "turn a training checkpoint into an inference model file (.safetensors + config)"

log = logging.getLogger("bsmamba2")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="training checkpoint (RUN_DIR/best.pt or last.pt) or a run folder "
                        "(its best.pt, else last.pt)")
    parser.add_argument("output", nargs="?", help="output .safetensors (default: next to the checkpoint, "
                        "same name with .safetensors)")
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema",
                        help="export the EMA weights (default, what validation scored) or the raw weights")


def export_checkpoint(checkpoint: str | Path, output: str | Path | None = None, weights: str = "ema") -> Path:
    """Write the model of a training checkpoint with `bsmamba2.checkpoint.save_model`; returns the output path."""
    from bsmamba2.checkpoint import save_model  # noqa: PLC0415
    from bsmamba2.build import build_model  # noqa: PLC0415
    from bsmamba2.train import load_checkpoint  # noqa: PLC0415
    from bsmamba2.trainconfig import run_config_from_dict  # noqa: PLC0415

    path = Path(checkpoint)
    if path.is_dir():
        path = path / "best.pt" if (path / "best.pt").is_file() else path / "last.pt"
    ckpt = load_checkpoint(path)
    config = run_config_from_dict(ckpt["config"])
    model = build_model(config.model)
    model.load_state_dict(ckpt["ema"]["model"] if weights == "ema" else ckpt["model"])
    model.eval()
    output = Path(output) if output else path.with_suffix(".safetensors")
    last_usdr = ckpt["history"][-1]["val_usdr"] if ckpt["history"] else None
    best_usdr = ckpt["best_usdr"] if math.isfinite(ckpt["best_usdr"]) else None  # -inf: never validated
    metadata = {"weights": weights, "step": ckpt["step"], "epoch": ckpt["epoch"], "best_val_usdr": best_usdr,
                "val_usdr": last_usdr, "source": path.name}
    save_model(model, output, metadata=metadata)
    return output


def run(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint, args.output, args.weights)
    log.info("wrote %s", out)
    return 0
