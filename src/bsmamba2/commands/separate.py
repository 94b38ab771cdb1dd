"""`bsmamba2 separate`: split songs (files or folders) into vocals and instrumental with a BSMamba2 checkpoint."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from bsmamba2 import catalog
from bsmamba2.audio import (
    AUDIO_EXTENSIONS,
    DEFAULT_BITRATES,
    INPUT_SUBTYPE,
    LOSSY,
    SUBTYPES,
    WRITE_FORMATS,
    AudioError,
    audio_info,
    encoder_options,
    resolve_format,
)
from bsmamba2.pretrained import DEFAULT_MODEL
from bsmamba2.separate import BACKENDS, DEFAULT_TEMPLATE, MANIFEST_NAME, MODES, Manifest, Separator

HELP = "separate songs into vocals and instrumental"

log = logging.getLogger("bsmamba2.separate")


def _input_path(text: str) -> Path:
    """An INPUT argument: an empty one (an unset shell variable, say) would mean the current folder, searched
    recursively, so it is refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path: give an audio file or a folder ('.' for this one)")
    return Path(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT", type=_input_path,
                   help="audio or video files, or folders searched recursively for them (wav, flac, mp3, ogg, opus, m4a, "
                        "wma, mp4, mkv, webm, …; the first audio stream of a video)")
    p.add_argument("-o", "--out-dir", type=Path, default=Path("separated"),
                   help="where outputs and manifest.json go (default: ./separated)")
    add_model_arguments(p)
    g = p.add_argument_group("chunking")
    g.add_argument("--segment", type=float, default=8.0,
                   help="seconds per model call, the training length by default; 0 = whole file at once (default 8)")
    g.add_argument("--overlap", type=float, default=0.5, help="overlap between segments, 0 <= x < 1 (default 0.5)")
    g.add_argument("--mode", choices=MODES, default="overlap-add",
                   help="overlap-add (default) or paper: the paper's evaluation, non-overlapping segments concatenated")
    g.add_argument("--paper", action="store_const", dest="mode", const="paper", help="same as --mode paper")
    g.add_argument("--batch-size", "-b", type=int, default=None,
                   help="segments per model call (default: 1 on a CPU, 8 on a GPU)")
    g = p.add_argument_group("device")
    g.add_argument("--device", "-d", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16", "int8"), default=None,
                   help="model precision. GPU: bf16/fp16 autocast. CPU: bf16 or int8 projections, the rest fp32. "
                        "Default: bf16 projections on a CPU that multiplies bf16 natively, else fp32")
    add_backend_arguments(g)
    g = p.add_argument_group("output")
    g.add_argument("--format", "-f", choices=sorted(WRITE_FORMATS), default="wav", help="output format (default wav)")
    g.add_argument("--subtype", type=str.upper, choices=SUBTYPES, default=None,
                   help="sample format of wav, flac and aiff (default: the input's, so 24-bit and float inputs give "
                        "24-bit and float stems, others PCM_16); FLOAT keeps values beyond ±1, the others clip them")
    g.add_argument("--bitrate", type=int, default=None, metavar="KBPS",
                   help="bitrate in kbit/s of mp3 (constant, 32 to 320; default {MP3}), m4a (AAC; default {M4A}) "
                        "and opus (default {OPUS}; opus is always 48 kHz)".format(**DEFAULT_BITRATES))
    g.add_argument("--sample-rate", type=int, default=None, help="output sample rate (default: the input's)")
    g.add_argument("--template", default=DEFAULT_TEMPLATE,
                   help="output path under OUT_DIR with {track} {filename} {stem} {ext} {parent} (default: %(default)s)")
    g.add_argument("--stems", default=None,
                   help="comma-separated stems to write (default: all, e.g. vocals,instrumental)")
    g.add_argument("--downmix", action="store_true",
                   help="fold inputs with more than two channels to stereo instead of failing")
    g.add_argument("--overwrite", action="store_true", help="redo inputs whose outputs already exist")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or per-file summaries")
    p.add_argument("--progress", choices=catalog.PROGRESS_MODES, default="bar",
                   help="bar (default), none, or json: one JSON line per update on stdout for schedulers (runs the "
                        "catalog engine, as `torchrun ... -m bsmamba2 separate` does on every GPU)")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model (alias --checkpoint) and --offline, shared by separate and evaluate."""
    p.add_argument("--model", "-m", "--checkpoint", "-c", dest="model", default=DEFAULT_MODEL, metavar="MODEL",
                   help=f"model name (see `bsmamba2 models`), checkpoint file (official .ckpt or bsmamba2 "
                        f".safetensors), URL, or hf://OWNER/REPO[/FILE]; default {DEFAULT_MODEL}, the paper's "
                        f"weights, downloaded into the cache on first use; 'demo' = the small bundled model")
    p.add_argument("--offline", action="store_true",
                   help="never use the network (also BSMAMBA2_OFFLINE=1); fail with what is missing instead")


def add_backend_arguments(g) -> None:
    """--backend, --providers and --onnx (shared with `bsmamba2 evaluate`)."""
    g.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="torch (default), onnxruntime or openvino: the network as ONNX in onnxruntime (pip install "
                        "'bsmamba2[onnx]') or OpenVINO (pip install 'bsmamba2[openvino]'; Intel/AMD CPUs, Intel "
                        "GPUs and NPUs), exported once per checkpoint and segment into the cache unless --onnx or an "
                        ".onnx --checkpoint is given")
    g.add_argument("--providers", default=None, metavar="LIST",
                   help="onnxruntime execution providers, comma-separated (cpu, cuda, dml, coreml, rocm or full "
                        "names), or the OpenVINO device (CPU, GPU, NPU, AUTO); default: by --device, the CPU for "
                        "cpu, else the first accelerator present (OpenVINO: AUTO)")
    g.add_argument("--onnx", default=None, metavar="FILE",
                   help="with --backend onnxruntime or openvino: this export of the checkpoint "
                        "(`bsmamba2 export --onnx`)")
    g.add_argument("--compile", choices=("auto", "on", "off"), default=None,
                   help="CPU inference through torch.compile (needs a C++ compiler; the first segment compiles, tens of "
                        "seconds, then cached): auto (default; fp32 inputs of a minute or more), on, off (default "
                        "also from BSMAMBA2_CPU_COMPILE)")


def find_inputs(inputs: list[Path], exclude: Path | None = None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand folders recursively to audio files; return (files, [(input, error)])."""
    files: list[Path] = []
    errors: list[tuple[Path, str]] = []
    exclude = exclude.resolve() if exclude is not None else None
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            files.append(path)

    for item in inputs:
        if item.is_dir():
            found = sorted(
                f for f in item.rglob("*")
                if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS and not f.name.startswith(".")
                and not (exclude is not None and f.resolve().is_relative_to(exclude))
            )  # fmt: skip
            if not found:
                errors.append((item, f"{item}: folder holds no audio files ({', '.join(AUDIO_EXTENSIONS[:6])}, …)"))
            for f in found:
                add(f)
        elif item.exists():
            add(item)
        else:
            errors.append((item, f"{item}: no such file or folder; check the path"))
    return files, errors


def backend_options(args: argparse.Namespace) -> dict:
    """Separator keyword arguments for --backend, --providers, --onnx and --compile."""
    if args.onnx and args.backend == "torch":
        raise ValueError("--onnx needs --backend onnxruntime or --backend openvino")
    return {"backend": args.backend, "providers": args.providers, "onnx": args.onnx, "compile": args.compile}


def _error_line(path: Path, err: BaseException) -> str:
    msg = str(err) or type(err).__name__
    return msg if str(path) in msg else f"{path}: {msg}"


def run(args: argparse.Namespace) -> int:
    package_log = logging.getLogger("bsmamba2")
    level = package_log.level
    if args.quiet:
        package_log.setLevel(logging.WARNING)
    try:
        return _run(args)
    finally:
        package_log.setLevel(level)


def _run(args: argparse.Namespace) -> int:
    job = catalog.join(args) if catalog.wanted(args) else None  # torchrun: this process's GPU is pinned here
    quiet = args.quiet or args.progress == "none"
    out_dir: Path = args.out_dir
    stems = [s.strip() for s in args.stems.split(",") if s.strip()] if args.stems else None

    files, failures = find_inputs(args.inputs, exclude=out_dir)
    for _, message in failures:
        log.error("error: %s", message)
    if not files:  # nothing to run: no model to load, no output folder to create
        log.warning("nothing to separate: none of the %d input(s) is an audio file that can be read",
                    len(args.inputs))
        return 1

    # Output format, checkpoint and settings errors concern every input: they end the run (cli.py turns them into
    # exit 1), before a model is loaded where they can be told without one.
    fmt, subtype = resolve_format(f"x.{args.format}", args.format, args.subtype)
    if args.subtype is None and fmt not in LOSSY:
        subtype = INPUT_SUBTYPE  # each file's stems follow its own depth (`separate_file`)
    encoder_options(fmt, args.bitrate, args.sample_rate)
    bitrate = (args.bitrate or DEFAULT_BITRATES[fmt]) if fmt in DEFAULT_BITRATES else None
    separator = Separator(
        args.model, device=args.device, precision=args.precision, segment=args.segment, overlap=args.overlap,
        batch_size=args.batch_size, mode=args.mode, offline=args.offline or None, progress=not quiet,
        **backend_options(args),
    )  # fmt: skip
    settings = separator.settings() | {
        "sample_rate": args.sample_rate, "format": args.format, "subtype": subtype, "downmix": args.downmix,
        "template": args.template, "stems": list(separator._select(stems)),
    }  # fmt: skip
    if bitrate is not None:  # only for mp3, m4a, opus, so the manifests of other formats keep their settings
        settings["bitrate"] = bitrate
    checkpoint_sha256 = separator.checkpoint_sha256
    manifest = Manifest(out_dir)
    log.debug("model: %s, stems %s, device %s, %s", separator.checkpoint_path, separator.stems, separator.device,
              separator.dtype)

    # Every input's outputs are known before any work: a bad template, an unknown stem or two inputs that would
    # write the same file end the run here, not after hours of separating the inputs before them.
    try:
        planned = {path: separator.output_paths(path, out_dir, args.template, args.format, stems) for path in files}
    except ValueError as err:
        log.error("error: %s", err)
        return 1
    clashes = _clashes(planned)
    for path, other in clashes:
        # the field that tells the two apart: their folders' names, else their full file names (song.wav, song.m4a)
        field = "parent" if path.resolve().parent.name != other.resolve().parent.name else "filename"
        example = "{parent}/{track}/{stem}.{ext}" if field == "parent" else "{filename}/{stem}.{ext}"
        log.error("error: %s: its outputs would overwrite those of %s; use a --template with {%s}, e.g. '%s'",
                  path, other, field, example)
    if clashes:
        log.warning("nothing separated: %d input(s) share output files with another input", len(clashes))
        return 1
    if job is not None:
        return catalog.run(job, args, separator, files, failures, settings)

    done = skipped = 0
    failed = len(failures)
    # On a terminal: a bar over the files, the current file's bar below it. Into a log (stderr not a terminal) a
    # second bar would move the cursor with escape codes; there each file gets one bar, numbered "[i/n]".
    nested = sys.stderr.isatty()
    with logging_redirect_tqdm():
        files_bar = tqdm(files, desc="files", unit="file", disable=quiet or len(files) < 2 or not nested, position=0)
        for index, path in enumerate(files_bar, 1):
            try:
                outputs = planned[path]
                input_sha256 = manifest.input_sha256(path)
                if not args.overwrite and all(p.exists() for p in outputs.values()):
                    entry = manifest.get(path)
                    if entry is None or manifest.is_done(path, input_sha256, checkpoint_sha256, settings, outputs):
                        log.info("%s: skipped, outputs exist (--overwrite to redo)", path)
                        skipped += 1
                        continue
                    log.info("%s: outputs exist but were made from another input, checkpoint or settings; redoing",
                             path)
                info = audio_info(path)
                manifest.update(
                    path, status="running", input_sha256=input_sha256, checkpoint_sha256=checkpoint_sha256,
                    checkpoint=str(separator.checkpoint_path) if separator.checkpoint_path else None,
                    settings=settings, error=None,
                )  # fmt: skip
                desc = path.name[:40] if nested or len(files) < 2 else f"[{index}/{len(files)}] {path.name[:32]}"
                with tqdm(total=round(info.duration, 2), desc=desc, unit="s", leave=False, position=int(nested),
                          disable=quiet, bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s [{elapsed}<{remaining}]") as bar:
                    result = separator.separate_file_result(
                        path, out_dir, template=args.template, format=args.format, subtype=subtype,
                        sample_rate=args.sample_rate, downmix=args.downmix, stems=stems, bitrate=bitrate,
                        progress=lambda sec: bar.update(min(sec, bar.total - bar.n)),
                    )  # fmt: skip
                manifest.update(
                    path, status="done", outputs={k: str(v) for k, v in result.outputs.items()},
                    duration_s=round(result.duration, 3), elapsed_s=round(result.elapsed, 3), rtf=round(result.rtf, 4),
                )  # fmt: skip
                done += 1
                log.info("%s: %.1f s of audio in %.1f s (real-time factor %.3f) -> %s", path, result.duration,
                         result.elapsed, result.rtf, _common_folder(list(result.outputs.values())))
            except KeyboardInterrupt:
                if manifest.get(path):
                    manifest.update(path, status="interrupted")
                raise
            except (AudioError, ValueError, FileNotFoundError, RuntimeError, OSError) as err:
                failed += 1
                log.error("error: %s", _error_line(path, err))
                if path.exists():
                    manifest.update(path, status="failed", error=str(err))
    if len(files) + len(failures) > 1 or failed:
        log.log(logging.WARNING if failed else logging.INFO,
                "%d separated, %d skipped, %d failed; manifest: %s", done, skipped, failed, out_dir / MANIFEST_NAME)
    return 1 if failed else 0


def _clashes(planned: dict[Path, dict[str, Path]]) -> list[tuple[Path, Path]]:
    """(input, earlier input) for each input with an output path that an earlier input already writes."""
    claimed: dict[Path, Path] = {}  # output path -> the input that writes it
    clashes = []
    for path, outputs in planned.items():
        keys = [p.resolve() for p in outputs.values()]
        taken = [claimed[k] for k in keys if k in claimed]
        if taken:
            clashes.append((path, taken[0]))
        else:
            claimed.update(dict.fromkeys(keys, path))
    return clashes


def _common_folder(paths: list[Path]) -> Path:
    parents = {p.parent for p in paths}
    return parents.pop() if len(parents) == 1 else paths[0].parent
