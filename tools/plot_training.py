"""Plot training runs from RUN_DIR/history.json: validation uSDR (EMA weights) and mean training loss per epoch.

    python tools/plot_training.py runs/curve --out training_curve.png
    python tools/plot_training.py runs/bsmamba2 runs/bsroformer --out compare.png   # several runs side by side
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from matplotlib.figure import Figure


def load_history(run: Path) -> list[dict]:
    path = run / "history.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found; is {run} a `bsmamba2 train` run folder?")
    history = json.loads(path.read_text())
    if not history:
        raise SystemExit(f"{path} has no validation entries yet")
    return history


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+", help="run folders (with history.json)")
    ap.add_argument("--out", type=Path, default=None, help="PNG path (default FIRST_RUN/training_curve.png)")
    ap.add_argument("--x", choices=("step", "minutes"), default="step", help="x axis (default: optimizer step)")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)

    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_loss, ax_usdr = fig.subplots(1, 2)
    for run in args.runs:
        history = load_history(run)
        x = [h.get(args.x, h["step"]) for h in history]
        ax_usdr.plot(x, [h["val_usdr"] for h in history], "o-", ms=3, label=run.name)
        if "train_loss" in history[0]:
            ax_loss.plot(x, [h["train_loss"] for h in history], "o-", ms=3, label=run.name)
    xlabel = "training time (min)" if args.x == "minutes" else "optimizer step"
    ax_loss.set(title="training loss (mean per epoch)", xlabel=xlabel, ylabel="10·L1(time) + multi-res STFT L1")
    ax_usdr.set(title="validation uSDR (EMA weights)", xlabel=xlabel, ylabel="dB")
    for ax in (ax_loss, ax_usdr):
        ax.grid(alpha=0.3)
        ax.legend()
    if args.title:
        fig.suptitle(args.title)
    out = args.out or args.runs[0] / "training_curve.png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
