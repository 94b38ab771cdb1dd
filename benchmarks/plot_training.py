"""Plot a training run's validation uSDR (and training loss) per epoch from RUN_DIR/history.json into a PNG.

    python benchmarks/plot_training.py runs/curve --out training_curve.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="run folder (with history.json)")
    ap.add_argument("--out", type=Path, default=None, help="PNG path (default RUN/training_curve.png)")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    history = json.loads((args.run / "history.json").read_text())
    if not history:
        raise SystemExit(f"{args.run}/history.json has no validation entries yet")
    x = [h.get("minutes", h["step"]) for h in history]
    xlabel = "training time (min)" if "minutes" in history[0] else "optimiser step"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(x, [h["val_usdr"] for h in history], "o-", color="tab:blue", label="validation uSDR (EMA weights)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("uSDR (dB)", color="tab:blue")
    ax.grid(alpha=0.3)
    if "train_loss" in history[0]:
        ax2 = ax.twinx()
        ax2.plot(x, [h["train_loss"] for h in history], "s--", color="tab:orange", ms=3, label="training loss")
        ax2.set_ylabel("training loss", color="tab:orange")
    last = history[-1]
    ax.set_title(args.title or f"{args.run.name}: {last['step']} steps, val uSDR {history[0]['val_usdr']:.2f} → "
                 f"{last['val_usdr']:.2f} dB (best {max(h['val_usdr'] for h in history):.2f})")
    fig.tight_layout()
    out = args.out or args.run / "training_curve.png"
    fig.savefig(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
