"""`bsmamba2 demo`: synthesize a sparse-vocal song, separate it, and show and score the result.

Writes into OUT_DIR: mixture.wav, reference_{vocals,instrumental}.wav, {vocals,instrumental}.wav (the estimates),
spectrograms.png (mixture / reference vocals / estimated vocals, sung phrases shaded, the leakage of every silent gap
written on the estimate's panel) and scores.json (with the time each stage took); prints uSDR, cSDR and silent-region
leakage next to those of two trivial baselines, and one line on what each of the model's scores means. The default
20-s song is separated in one model call (BSMamba2 takes any length; no overlap to recompute).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

HELP = "synthesize a sparse-vocal song, separate it with the bundled (or given) model, write audio, a figure and scores"
log = logging.getLogger("bsmamba2")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--out-dir", type=Path, default=Path("demo"), help="output folder (default ./demo)")
    p.add_argument("--checkpoint", "-c", type=Path, default=None, help="model to use (default: the bundled model)")
    p.add_argument("--seed", type=int, default=2025, help="song seed (default 2025)")
    p.add_argument("--seconds", type=float, default=20.0, help="song length (default 20)")
    p.add_argument("--vocal-activity", choices=("sparse", "mixed", "dense"), default="sparse")
    p.add_argument("--segment", type=float, default=20.0,
                   help="seconds per model call (default 20: the default song in one call; 0 = the whole song)")
    p.add_argument("--overlap", type=float, default=0.0,
                   help="overlap fraction of consecutive segments (default 0: one call per segment)")
    p.add_argument("--device", "-d", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", choices=("fp32", "bf16", "int8"), default=None,
                   help="model precision (default: bf16 projections on a CPU that multiplies bf16 natively, else fp32)")
    p.add_argument("--quiet", "-q", action="store_true")


def run(args: argparse.Namespace) -> int:
    from bsmamba2 import metrics  # noqa: PLC0415 - keep `bsmamba2 --help` fast
    from bsmamba2.audio import write_audio  # noqa: PLC0415
    from bsmamba2.data.synth import generate_song  # noqa: PLC0415
    from bsmamba2.plots import annotate_gaps, plot_spectrograms, save_figure  # noqa: PLC0415
    from bsmamba2.separate import Separator  # noqa: PLC0415

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    clock = time.perf_counter()
    # A song no longer than a segment goes through in one call, unpadded.
    segment = 0.0 if args.segment == 0 or args.segment >= args.seconds else args.segment
    # the bundled model unless one is given
    separator = Separator(args.checkpoint or "demo", device=args.device, precision=args.precision, segment=segment,
                          overlap=args.overlap)
    timings["load_model"] = time.perf_counter() - clock

    log.info("synthesizing a %.0f-s song with %s vocals (seed %d)", args.seconds, args.vocal_activity, args.seed)
    clock = time.perf_counter()
    song = generate_song(args.seed, args.seconds, args.vocal_activity)
    timings["synthesize"] = time.perf_counter() - clock
    sr = song.sample_rate
    mix = torch.from_numpy(song.mixture)  # (c, t)
    ref_vocals = torch.from_numpy(song.stems["vocals"])
    ref_inst = mix - ref_vocals

    t0 = time.perf_counter()
    with tqdm(total=round(song.seconds, 2), desc="separating", unit="s", disable=args.quiet,
              bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s [{elapsed}<{remaining}]") as bar:
        est = separator.separate(mix, sr, progress=bar.update)
    elapsed = time.perf_counter() - t0
    vocals, inst = est["vocals"], est["instrumental"]
    timings["separate"] = elapsed

    clock = time.perf_counter()
    for name, wave in {"mixture": mix, "reference_vocals": ref_vocals, "reference_instrumental": ref_inst,
                       "vocals": vocals, "instrumental": inst}.items():
        write_audio(out / f"{name}.wav", wave, sr, subtype="FLOAT")

    scores = {
        "model": {"usdr": metrics.usdr(vocals, ref_vocals), "csdr": metrics.csdr(vocals, ref_vocals, sr),
                  "leakage_db": metrics.silent_leakage(vocals, ref_vocals, mix, sr)},
        # two reference points: output the mixture itself, or output silence
        "mixture as estimate": {"usdr": metrics.usdr(mix, ref_vocals), "csdr": metrics.csdr(mix, ref_vocals, sr),
                                "leakage_db": metrics.silent_leakage(mix, ref_vocals, mix, sr)},
        # an all-zero estimate has no defined cSDR (museval rejects silent estimates) nor leakage
        "silence as estimate": {"usdr": metrics.usdr(torch.zeros_like(mix), ref_vocals), "csdr": float("nan"),
                                "leakage_db": float("nan")},
    }
    scores["instrumental_usdr"] = metrics.usdr(inst, ref_inst)
    gaps = metrics.silent_gap_leakage(vocals, ref_vocals, mix, sr)
    scores["leakage_per_gap"] = gaps
    scores["seconds_taken"] = elapsed
    timings["write_audio_and_score"] = time.perf_counter() - clock
    scores["song"] = {"seed": args.seed, "seconds": song.seconds, "vocal_activity": args.vocal_activity,
                      "vocal_regions": song.vocal_regions}
    scores["checkpoint"] = str(separator.checkpoint_path) if separator.checkpoint_path else None

    clock = time.perf_counter()
    fig = plot_spectrograms({"mixture": mix, "reference vocals": ref_vocals, "estimated vocals": vocals}, sr,
                            title=f"bsmamba2 demo: synthetic song, {args.vocal_activity} vocals (shaded: sung; "
                            "numbers: leakage per silent gap)")
    for ax in fig.axes[:3]:
        for start, end in song.vocal_regions:
            ax.axvspan(start, end, color="cyan", alpha=0.12, lw=0)
            ax.axvline(start, color="cyan", lw=0.6, alpha=0.6)
    annotate_gaps(fig.axes[2], gaps)
    save_figure(fig, out / "spectrograms.png")
    timings["figure"] = time.perf_counter() - clock
    scores["timings_s"] = timings
    (out / "scores.json").write_text(json.dumps(scores, indent=1, default=float))
    log.info("time: %s", ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))

    if not args.quiet:
        print(f"separated {song.seconds:.1f} s in {elapsed:.1f} s on {separator.device} "
              f"({separator.precision_name}) -> {out}/")
        print(f"{'vocals estimate':<22}{'uSDR dB':>9}{'cSDR dB':>9}{'leakage dB':>12}")
        for name in ("model", "mixture as estimate", "silence as estimate"):
            s = scores[name]
            print(f"{name:<22}{s['usdr']:>9.2f}{s['csdr']:>9.2f}{s['leakage_db']:>12.1f}")
        print("what the model's scores mean:")
        for line in explain_scores(scores):
            print("  " + line)
    if not np.isfinite(scores["model"]["usdr"]):
        raise RuntimeError("separation produced non-finite scores; the checkpoint may be broken")
    return 0


def explain_scores(scores: dict) -> list[str]:
    """One line per score of the model: its value and what it means on this song."""
    m, mix = scores["model"], scores["mixture as estimate"]
    leak = m["leakage_db"]
    gaps = scores.get("leakage_per_gap") or []
    worst = max((g["leakage_db"] for g in gaps), default=float("nan"))
    if not math.isfinite(leak):
        heard = "no silent stretch in this song to measure"
    elif leak <= -40:
        heard = "the gaps are practically silent"
    elif leak <= -30:
        heard = "about a thousandth of the mixture's energy: faint, the gaps sound silent"
    elif leak <= -20:
        heard = "about a hundredth: accompaniment audible in the gaps if you listen for it"
    else:
        heard = "accompaniment clearly audible in the gaps"
    return [
        f"uSDR    {m['usdr']:6.2f} dB  vocal estimate against the true vocal over the whole song, higher is better "
        f"({m['usdr'] - mix['usdr']:+.1f} dB over handing back the mixture)",
        f"cSDR    {m['csdr']:6.2f} dB  median of 1-s frames; in a sparse song most frames hold no singing, so it mostly "
        "scores the near-silent frames",
        f"leakage {leak:6.1f} dB  what the estimate lets through where nobody sings, relative to the mixture there, "
        f"lower is better: {heard} (worst gap {worst:.0f} dB)",
        f"instrumental uSDR {scores['instrumental_usdr']:.2f} dB  the accompaniment (mixture minus the vocal "
        "estimate) against the true accompaniment",
    ]
