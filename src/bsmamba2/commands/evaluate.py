"""`bsmamba2 evaluate`: the paper's metrics on a MUSDB18-HQ-layout folder (Tables II, III, IV) with reports and plots."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from bsmamba2.commands.separate import add_backend_arguments, add_model_arguments, backend_options

HELP = "score a checkpoint on MUSDB18-HQ: cSDR/uSDR per track and overall, vocal-segment and input-length analyses"

log = logging.getLogger("bsmamba2")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="MUSDB18-HQ root holding train/ and test/ track folders")
    parser.add_argument("--subset", default="test", choices=("train", "test"), help="which split (default: test)")
    parser.add_argument("--tracks", nargs="+", metavar="NAME", help="only these track folders")
    parser.add_argument("-o", "--output", metavar="REPORT_DIR",
                        help="report folder (default: eval-<checkpoint name>-<subset>)")
    sep = parser.add_argument_group("separation (default: the paper's non-overlapping 8-s segments)")
    sep.add_argument("--mode", choices=("paper", "overlap-add"),
                     help="paper: non-overlapping segments concatenated (default); overlap-add: blended overlaps "
                          "(chosen automatically when --overlap > 0)")
    sep.add_argument("--segment", type=float, default=8.0, help="input length per model call in seconds (default 8)")
    sep.add_argument("--overlap", type=float, help="overlap fraction in overlap-add mode (default 0.5 there, 0 in paper)")
    sep.add_argument("--batch-size", type=int, default=None,
                   help="segments per model call (default: 1 on a CPU, 8 on a GPU)")
    sep.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    sep.add_argument("--precision", choices=("fp32", "bf16", "fp16", "int8"),
                     help="default fp32. GPU: bf16/fp16 autocast. CPU: bf16 or int8 projections, the rest fp32")
    add_backend_arguments(sep)
    ana = parser.add_argument_group("analyses")
    ana.add_argument("--segment-sweep", nargs="+", type=float, metavar="SECONDS",
                     help="Table IV: evaluate again for each input length, e.g. 1 2 4 8 12 16")
    ana.add_argument("--by-vocal-segment", action="store_true",
                     help="Table III: uSDR over vocal-active regions bucketed by duration (1-2, 2-4, 4-8, >=8 s)")
    ana.add_argument("--vocal-threshold-db", type=float, default=-30.0,
                     help="vocal activity: a 50-ms frame is active within this many dB of the loudest (default -30)")
    ana.add_argument("--vocal-floor-db", type=float, default=-60.0,
                     help="vocal activity: and at least this loud in dBFS (default -60)")
    ana.add_argument("--vocal-min-gap", type=float, default=0.3,
                     help="vocal regions: fill silent gaps shorter than this many seconds (default 0.3)")
    out = parser.add_argument_group("output")
    out.add_argument("--save-estimates", action="store_true",
                     help="write REPORT_DIR/estimates/<track>/{vocals,instrumental}.wav (32-bit float)")
    out.add_argument("--plot-track", metavar="NAME", help="track for the spectrogram figure (default: the first)")
    out.add_argument("--plot-start", type=float, default=0.0, help="spectrogram start in seconds (default 0)")
    out.add_argument("--plot-duration", type=float, default=10.0, help="spectrogram length in seconds (default 10)")
    out.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    out.add_argument("--force", action="store_true", help="recompute tracks already finished in REPORT_DIR")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from bsmamba2 import evaluate as ev  # noqa: PLC0415  (heavy imports only when the command runs)
    from bsmamba2 import plots  # noqa: PLC0415
    from bsmamba2.audio import read_audio  # noqa: PLC0415
    from bsmamba2.pretrained import model_from_file, resolve, sha256_file  # noqa: PLC0415
    from bsmamba2.metrics import ActivityConfig  # noqa: PLC0415
    from bsmamba2.separate import Separator  # noqa: PLC0415

    mode = args.mode or ("overlap-add" if args.overlap else "paper")
    overlap = args.overlap if args.overlap is not None else (0.5 if mode == "overlap-add" else 0.0)
    activity = ActivityConfig(
        relative_db=args.vocal_threshold_db, absolute_db=args.vocal_floor_db, min_gap_seconds=args.vocal_min_gap
    )
    tracks = ev.find_tracks(args.data, args.subset, args.tracks)
    names = [t.name for t in tracks]
    plot_track = None if args.no_plots else (args.plot_track or names[0])
    if plot_track is not None and plot_track not in names:
        raise ValueError(f"--plot-track {plot_track!r} is not among the evaluated tracks; pick one of {names[:5]}")

    ckpt = resolve(args.model, offline=args.offline or None, progress=not args.no_progress)
    backend = backend_options(args)
    # onnxruntime, openvino: the Separator exports (or finds in the cache) the checkpoint file's network per segment
    model = model_from_file(ckpt) if args.backend == "torch" else ckpt
    settings = ev.EvalSettings(
        checkpoint=sha256_file(ckpt), mode=mode, segment=args.segment, overlap=overlap,
        precision=args.precision or "fp32", activity=activity, backend=args.backend,
    )  # fmt: skip
    out = Path(args.output or f"eval-{ckpt.stem}-{args.subset}")
    log.info("evaluating %s on %d %s track(s) from %s -> %s", ckpt.name, len(tracks), args.subset, args.data, out)

    def make_separator(segment: float) -> Separator:
        return Separator(
            model, device=args.device, precision=args.precision, segment=segment, overlap=overlap,
            batch_size=args.batch_size, mode=mode, **backend,
        )  # fmt: skip

    separator = make_separator(args.segment)
    result = ev.evaluate_tracks(
        separator, tracks, settings, out, resume=not args.force, save_estimates=args.save_estimates,
        keep_estimates=[plot_track] if plot_track else (), progress=not args.no_progress,
        sample_rate=separator.sample_rate,
    )  # fmt: skip
    print(ev.format_summary(result))
    if args.by_vocal_segment:
        print("\nuSDR by vocal-segment duration (Table III):")
        print(ev.format_vocal_segment_table(ev.vocal_segment_table(result)))

    if args.segment_sweep:
        rows = ev.segment_sweep(
            make_separator, tracks, args.segment_sweep, settings, out, resume=not args.force,
            progress=not args.no_progress, sample_rate=separator.sample_rate, done={float(args.segment): result},
        )  # fmt: skip
        print("\nInput-length sweep (Table IV):")
        print(ev.format_sweep_table(rows))
        if not args.no_plots:
            plots.plot_segment_sweep(rows, out / "segment_sweep.png")

    if plot_track is not None:
        plots.plot_track_scores(result.rows, out / "csdr_per_track.png", title=f"vocals cSDR per track — {ckpt.name}")
        track = next(t for t in result.tracks if t.row["track"] == plot_track)
        folder = next(t for t in tracks if t.name == plot_track).folder
        if track.estimates is None:
            log.warning("no estimate kept for %s; skipping the spectrogram figure", plot_track)
        else:
            mixture, sr = read_audio(folder / "mixture.wav")
            reference, _ = read_audio(folder / "vocals.wav")
            duration = min(args.plot_duration, mixture.shape[-1] / sr - args.plot_start)
            path = out / f"spectrogram_{ev.safe_name(plot_track)}.png"
            plots.plot_spectrograms(
                {"mixture": mixture, "reference vocals": reference, f"estimated vocals ({ckpt.name})": track.estimates["vocals"]},
                sr, path, start=args.plot_start, duration=duration, title=plot_track,
            )  # fmt: skip
        log.info("figures written to %s", out)
    sys.stdout.flush()
    return 0
