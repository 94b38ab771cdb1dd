"""Training curves of the runs under RUNS_DIR (one sub-folder per run): validation uSDR from history.json and, when
TensorBoard logs are there, the training loss. Writes one PNG.

    python experiments/sparse_vocals/plot_curves.py RUNS_DIR OUT.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from matplotlib.figure import Figure


def training_loss(run: Path) -> tuple[list[int], list[float]]:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return [], []
    logs = [p.parent for p in run.rglob("events.out.tfevents.*")]
    if not logs:
        return [], []
    acc = EventAccumulator(str(logs[0]))
    acc.Reload()
    if "train/loss" not in acc.Tags().get("scalars", []):
        return [], []
    events = acc.Scalars("train/loss")
    return [e.step for e in events], [e.value for e in events]


def main(runs_dir: str, out_png: str) -> None:
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_loss, ax_usdr = fig.subplots(1, 2)
    for run in sorted(p for p in Path(runs_dir).iterdir() if (p / "history.json").is_file()):
        history = json.loads((run / "history.json").read_text())
        ax_usdr.plot([h["step"] for h in history], [h["val_usdr"] for h in history], marker="o", ms=3,
                     label=run.name)
        steps, loss = training_loss(run)
        if steps:
            ax_loss.plot(steps, loss, label=run.name, lw=1)
    ax_loss.set(title="training loss", xlabel="optimizer step", ylabel="10·L1(time) + multi-res STFT L1")
    ax_loss.set_yscale("log")
    ax_usdr.set(title="validation uSDR (EMA weights)", xlabel="optimizer step", ylabel="dB")
    for ax in (ax_loss, ax_usdr):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(out_png, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:3])
