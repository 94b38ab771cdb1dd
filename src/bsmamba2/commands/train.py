"""`bsmamba2 train`: train BSMamba2 (or the BS-RoFormer baseline) on a MUSDB18-HQ-layout folder."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

HELP = "train a model on MUSDB18-HQ (one process, or several through torchrun)"

log = logging.getLogger("bsmamba2")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="run config: a YAML path or a shipped name (bsmamba2-paper, "
                        "bsroformer-paper, tiny); default: RUN_DIR/config.yaml with --resume, else bsmamba2-paper")
    parser.add_argument("--data", help="MUSDB18-HQ root (ROOT/train/<track>/vocals.wav ...); overrides data.root")
    parser.add_argument("--out", required=True, help="run folder for checkpoints, config.yaml and TensorBoard logs")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    parser.add_argument("--init-from", metavar="MODEL",
                        help="fine-tune: start from these weights (a model name such as bsmamba2-musdb or demo, a "
                        "checkpoint path, URL or hf:// id) with a fresh optimizer; the model config must match "
                        "(train.init_from)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    parser.epilog = ("multi-GPU: torchrun --nproc-per-node N -m bsmamba2 train ...; the accumulation adapts so that "
                     "train.effective_batch stays the same")


def run(args: argparse.Namespace) -> int:
    from bsmamba2.train import cleanup_distributed, train  # noqa: PLC0415  (torch import only when needed)
    from bsmamba2.trainconfig import load_run_config  # noqa: PLC0415

    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger("bsmamba2").setLevel(logging.WARNING)  # under torchrun only rank 0 reports progress
    out = Path(args.out)
    name = args.config
    if name is None:
        name = out / "config.yaml" if args.resume and (out / "config.yaml").is_file() else "bsmamba2-paper"
    if args.resume and not (out / "last.pt").is_file():
        raise FileNotFoundError(f"--resume: {out / 'last.pt'} does not exist; start the run without --resume")
    if not args.resume and (out / "last.pt").is_file():
        raise ValueError(f"{out} already holds a run (last.pt); pass --resume to continue it or pick another --out")
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.root={args.data}")
    if args.init_from:
        if args.resume:
            raise ValueError("--init-from starts a new run from other weights; --resume continues this run's own "
                             "(last.pt): pass one of them")
        overrides.append(f"train.init_from={args.init_from}")
    config = load_run_config(name, overrides)
    try:
        result = train(config, out, resume=args.resume)
    finally:
        cleanup_distributed()
    best = f"{result.best_usdr:.3f} dB" if result.history else "n/a (no validation tracks)"
    ckpt = out / ("best.pt" if result.history else "last.pt")
    log.info("stopped at step %d (epoch %d), best validation uSDR %s; export with `bsmamba2 export %s`",
             result.step, result.epoch, best, ckpt)
    return 0
