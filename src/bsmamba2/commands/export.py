"""`bsmamba2 export`: training checkpoint (last.pt / best.pt) → inference model (.safetensors with its config);
with --onnx, any checkpoint → the network as an ONNX file for onnxruntime (`bsmamba2.onnx_backend`)."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

HELP = "turn a training checkpoint into an inference model file (.safetensors + config), or any checkpoint into ONNX"

log = logging.getLogger("bsmamba2")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="training checkpoint (RUN_DIR/best.pt or last.pt) or a run folder "
                        "(its best.pt, else last.pt)")
    parser.add_argument("output", nargs="?", help="output .safetensors (default: next to the checkpoint, "
                        "same name with .safetensors)")
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema",
                        help="export the EMA weights (default, what validation scored) or the raw weights")
    onnx = parser.add_argument_group("ONNX (the network between STFT and iSTFT, for onnxruntime; needs onnx)")
    onnx.add_argument("--onnx", metavar="FILE", default=None,
                      help="write the network as ONNX to FILE instead; CHECKPOINT may then also be an official .ckpt "
                           "or a bsmamba2 .safetensors")
    onnx.add_argument("--segment", type=float, default=8.0,
                      help="seconds per segment the ONNX network takes; separate with the same --segment (default 8)")
    onnx.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                      help="fp32 (default) or int8: MatMul weights quantized dynamically (CPU)")
    onnx.add_argument("--opset", type=int, default=None, help="ONNX opset, >= 17 (default 18)")


def export_checkpoint(checkpoint: str | Path, output: str | Path | None = None, weights: str = "ema") -> Path:
    """Write the model of a training checkpoint with `bsmamba2.checkpoint.save_model`; returns the output path."""
    from bsmamba2.checkpoint import save_model  # noqa: PLC0415
    from bsmamba2.build import build_model  # noqa: PLC0415
    from bsmamba2.train import load_checkpoint  # noqa: PLC0415
    from bsmamba2.trainconfig import run_config_from_dict  # noqa: PLC0415

    path = _run_checkpoint(checkpoint)
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


def _run_checkpoint(checkpoint: str | Path) -> Path:
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "best.pt" if (path / "best.pt").is_file() else path / "last.pt"
    return path


def export_onnx_file(checkpoint: str | Path, output: str | Path, segment: float = 8.0, precision: str = "fp32",
                     weights: str = "ema", opset: int | None = None) -> Path:
    """Export the network of a checkpoint (official .ckpt, bsmamba2 .safetensors, or a training run's .pt / folder)
    to ONNX for `segment`-second segments; returns the output path."""
    import torch  # noqa: PLC0415

    from bsmamba2.checkpoint import load_model  # noqa: PLC0415
    from bsmamba2.onnx_backend import OPSET, export_onnx  # noqa: PLC0415
    from bsmamba2.pretrained import sha256_file  # noqa: PLC0415

    path = _run_checkpoint(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; pass an official .ckpt, a bsmamba2 .safetensors or a "
                                "training run's best.pt/last.pt")
    if path.suffix.lower() in (".ckpt", ".safetensors"):
        model = load_model(path)
    else:  # a training checkpoint: its EMA (or raw) weights
        from bsmamba2.model import build_model  # noqa: PLC0415
        from bsmamba2.train import load_checkpoint  # noqa: PLC0415
        from bsmamba2.trainconfig import run_config_from_dict  # noqa: PLC0415

        ckpt = load_checkpoint(path)
        model = build_model(run_config_from_dict(ckpt["config"]).model)
        model.load_state_dict(ckpt["ema"]["model"] if weights == "ema" else ckpt["model"])
    if not (segment > 0 and math.isfinite(segment)):
        raise ValueError(f"--segment must be > 0 seconds for ONNX (the network takes fixed segments), got {segment}")
    with torch.no_grad():
        return export_onnx(model.eval(), output, round(segment * model.sample_rate), precision=precision,
                           checkpoint_sha256=sha256_file(path), opset=opset or OPSET)


def run(args: argparse.Namespace) -> int:
    if args.onnx:
        if args.output:
            raise ValueError("give either OUTPUT (.safetensors) or --onnx FILE, not both")
        out = export_onnx_file(args.checkpoint, args.onnx, args.segment, args.precision, args.weights, args.opset)
        log.info("wrote %s; separate with `bsmamba2 separate SONG --checkpoint %s --segment %g`", out, out,
                 args.segment)
        return 0
    out = export_checkpoint(args.checkpoint, args.output, args.weights)
    log.info("wrote %s", out)
    return 0
