"""Evaluation on a MUSDB18-HQ-layout folder: the paper's Table II (cSDR, uSDR), III (uSDR by vocal-segment
duration) and IV (input-length sweep), plus silent-region leakage, written as CSV/JSON reports and plots.

Read top to bottom: find and validate tracks → separate each mixture → score vocals (and the instrumental) →
save one JSON per track (so a stopped run resumes where it left off) → aggregate and write the reports.

Layout expected (MUSDB18-HQ)::

    ROOT/{train,test}/<track>/{mixture,vocals,drums,bass,other}.wav

Metrics are those of `bsmamba2.metrics`: per track uSDR, cSDR (museval-equal), leakage (dB); dataset cSDR is the
median over tracks, uSDR the mean over tracks.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from bsmamba2 import metrics
from bsmamba2.audio import audio_info, read_audio, write_audio
from bsmamba2.metrics import ActivityConfig

log = logging.getLogger(__name__)

STEMS = ("mixture", "vocals", "drums", "bass", "other")
ACCOMPANIMENT = ("drums", "bass", "other")
SUBSETS = ("train", "test")
MODES = ("paper", "overlap-add")
RESULT_VERSION = 1

# Columns of the per-track CSV, in order.
TRACK_COLUMNS = (
    "track",
    "duration_s",
    "usdr",
    "csdr",
    "leakage_db",
    "instrumental_usdr",
    "instrumental_csdr",
    "separate_s",
    "seconds",
)


class SeparatorLike(Protocol):
    """What evaluation needs from `bsmamba2.separate.Separator`."""

    def separate(self, waveform: torch.Tensor, sample_rate: int) -> dict[str, torch.Tensor]: ...


# ---------------------------------------------------------------------------------------------------------------
# Dataset layout


@dataclass(frozen=True)
class Track:
    """One validated MUSDB18-HQ track folder."""

    name: str
    folder: Path
    sample_rate: int
    channels: int
    frames: int

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate

    def path(self, stem: str) -> Path:
        return self.folder / f"{stem}.wav"


def validate_track(folder: str | os.PathLike) -> Track:
    """Check one track folder: all five stems present, readable, same sample rate, channel count and length.

    Raises:
        ValueError naming every problem found in the folder.
    """
    folder = Path(folder)
    problems: list[str] = []
    missing = [s for s in STEMS if not (folder / f"{s}.wav").is_file()]
    if missing:
        present = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        problems.append(
            f"missing {', '.join(f'{s}.wav' for s in missing)} (found: {', '.join(present) or 'nothing'})"
        )
    infos = {}
    for stem in STEMS:
        if stem in missing:
            continue
        try:
            infos[stem] = audio_info(folder / f"{stem}.wav")
        except ValueError as err:
            problems.append(str(err))
    if infos:
        ref = infos.get("mixture") or next(iter(infos.values()))
        ref_name = ref.path.name
        for stem, info in infos.items():
            if info.sample_rate != ref.sample_rate:
                problems.append(f"{stem}.wav is {info.sample_rate} Hz but {ref_name} is {ref.sample_rate} Hz")
            if info.channels != ref.channels:
                problems.append(f"{stem}.wav has {info.channels} channels but {ref_name} has {ref.channels}")
            if info.frames != ref.frames:
                problems.append(
                    f"{stem}.wav has {info.frames} samples but {ref_name} has {ref.frames} "
                    f"({info.frames / max(info.sample_rate, 1):.3f} s vs {ref.frames / max(ref.sample_rate, 1):.3f} s)"
                )
        if ref.frames == 0:
            problems.append("the stems are empty")
    if problems:
        raise ValueError(f"track '{folder.name}' ({folder}): " + "; ".join(problems))
    ref = infos["mixture"]
    return Track(folder.name, folder, ref.sample_rate, ref.channels, ref.frames)


def find_tracks(root: str | os.PathLike, subset: str = "test", names: Sequence[str] | None = None) -> list[Track]:
    """All tracks of ``ROOT/<subset>/``, validated, sorted by name.

    Args:
        root: MUSDB18-HQ root (holding ``train/`` and ``test/``).
        subset: "train" or "test".
        names: only these track folders (all must exist).
    Raises:
        FileNotFoundError when the root or subset folder is missing; ValueError listing every invalid track.
    """
    root = Path(root)
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {', '.join(SUBSETS)}, got '{subset}'")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder; --data must be a MUSDB18-HQ root holding train/ and test/")
    base = root / subset
    if not base.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        hint = ""
        if (root / "mixture.wav").exists() or (root.parent.name in SUBSETS):
            hint = " (it looks like a track or subset folder; pass the folder above train/ and test/)"
        raise FileNotFoundError(
            f"{base}: no '{subset}' folder in {root} (found: {', '.join(found) or 'nothing'}){hint}; "
            "expected ROOT/{train,test}/<track>/{mixture,vocals,drums,bass,other}.wav"
        )
    folders = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if names:
        by_name = {p.name: p for p in folders}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(
                f"no track named {', '.join(repr(n) for n in unknown)} in {base}; "
                f"available: {', '.join(sorted(by_name)[:10])}{' …' if len(by_name) > 10 else ''}"
            )
        folders = [by_name[n] for n in names]
    if not folders:
        raise ValueError(f"{base}: holds no track folders; expected {base}/<track>/mixture.wav etc.")
    tracks, problems = [], []
    for folder in folders:
        try:
            tracks.append(validate_track(folder))
        except ValueError as err:
            problems.append(str(err))
    if problems:
        more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(
            f"{len(problems)} invalid track folder(s) in {base}:\n  " + "\n  ".join(problems[:20]) + more
        )
    return tracks


def load_track(track: Track) -> dict[str, torch.Tensor]:
    """Read all stems of a track: {stem: (channels, time) float32}."""
    out = {}
    for stem in STEMS:
        wave, sr = read_audio(track.path(stem))
        if sr != track.sample_rate or wave.shape[-1] != track.frames:
            raise ValueError(f"{track.path(stem)}: changed on disk since validation; run again")
        out[stem] = wave
    return out


# ---------------------------------------------------------------------------------------------------------------
# Settings and one track


@dataclass
class EvalSettings:
    """How tracks are separated and scored; stored with every per-track result so that resuming never mixes runs."""

    checkpoint: str = ""
    mode: str = "paper"
    segment: float = 8.0
    overlap: float = 0.0
    precision: str = "fp32"
    activity: ActivityConfig = field(default_factory=ActivityConfig)
    backend: str = "torch"  # "onnxruntime" or "openvino": the network ran as an ONNX export in that runtime

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if not self.segment > 0:
            raise ValueError(f"segment must be a positive number of seconds, got {self.segment}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.mode == "paper" and self.overlap:
            raise ValueError("the paper's mode concatenates non-overlapping segments; use --mode overlap-add for overlap")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["activity"] = self.activity.as_dict()
        if self.backend == "torch":  # recorded only when not the default, so earlier reports still resume
            del d["backend"]
        return d


def _match_length(wave: torch.Tensor, length: int) -> torch.Tensor:
    """Trim or zero-pad the time axis to `length` (as museval's pad_or_truncate does)."""
    if wave.shape[-1] > length:
        return wave[..., :length]
    if wave.shape[-1] < length:
        return torch.nn.functional.pad(wave, (0, length - wave.shape[-1]))
    return wave


def score_track(
    estimates: Mapping[str, torch.Tensor],
    stems: Mapping[str, torch.Tensor],
    sample_rate: int,
    activity: ActivityConfig = ActivityConfig(),
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """All per-track numbers for one separated track.

    Args:
        estimates: {"vocals": (channels, time), optionally "instrumental": ...}.
        stems: the track's stems as `load_track` gives them.
    Returns:
        (row with usdr, csdr, leakage_db, instrumental_usdr, instrumental_csdr; vocal regions with their uSDR).
    """
    length = stems["mixture"].shape[-1]
    ref = stems["vocals"].double()
    est = _match_length(estimates["vocals"].detach().cpu(), length).double()
    if est.shape != ref.shape:
        raise ValueError(f"the vocal estimate has shape {tuple(est.shape)}, the reference {tuple(ref.shape)}")
    row: dict[str, float] = {
        "usdr": metrics.usdr(est, ref),
        "csdr": metrics.csdr(est, ref, sample_rate),
        "leakage_db": metrics.silent_leakage(est, ref, stems["mixture"], sample_rate, activity),
    }
    inst_ref = sum(stems[s].double() for s in ACCOMPANIMENT)
    if "instrumental" in estimates:
        inst = _match_length(estimates["instrumental"].detach().cpu(), length).double()
    else:
        inst = stems["mixture"].double() - est
    row["instrumental_usdr"] = metrics.usdr(inst, inst_ref)
    row["instrumental_csdr"] = metrics.csdr(inst, inst_ref, sample_rate)
    regions = metrics.region_usdr(est, ref, sample_rate, activity)
    return row, regions


def safe_name(name: str) -> str:
    """A track name usable as a file name."""
    return re.sub(r"[^\w.\- ]+", "_", name).strip() or "track"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def _dumps(obj: Any) -> str:
    # NaN/inf are kept (Python's json reads them back); reports are for people and for this program.
    return json.dumps(obj, indent=2, default=_json_default, allow_nan=True) + "\n"


@dataclass
class TrackResult:
    """Numbers for one track and, when kept, its estimates."""

    row: dict[str, Any]
    regions: list[dict[str, Any]]
    estimates: dict[str, torch.Tensor] | None = None
    resumed: bool = False


@dataclass
class EvalResult:
    """Everything one evaluation pass produced."""

    settings: EvalSettings
    tracks: list[TrackResult]
    summary: dict[str, Any]
    out_dir: Path | None = None

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [t.row for t in self.tracks]

    @property
    def regions(self) -> list[dict[str, Any]]:
        return [dict(r, track=t.row["track"]) for t in self.tracks for r in t.regions]


def evaluate_tracks(
    separator: SeparatorLike,
    tracks: Sequence[Track],
    settings: EvalSettings,
    out_dir: str | os.PathLike | None = None,
    resume: bool = True,
    save_estimates: bool = False,
    keep_estimates: Iterable[str] = (),
    progress: bool = True,
    sample_rate: int | None = None,
) -> EvalResult:
    """Separate and score every track; write per-track JSON and the CSV/JSON reports under `out_dir`.

    Args:
        separator: has ``.separate(waveform (channels, time), sample_rate) -> {"vocals": ..., ...}``.
        tracks: from `find_tracks`.
        settings: recorded with each result; a stored result is reused only if its settings are equal.
        out_dir: report folder (None: nothing written, nothing resumed).
        resume: reuse finished tracks found in ``out_dir/tracks/`` (False recomputes them).
        save_estimates: write ``out_dir/estimates/<track>/{vocals,instrumental}.wav``.
        keep_estimates: names of tracks whose estimates to return in memory (e.g. for plots).
        sample_rate: the model's rate; tracks at another rate are refused.
    Returns:
        EvalResult with per-track rows, vocal regions and the dataset summary.
    """
    out = Path(out_dir) if out_dir is not None else None
    keep = set(keep_estimates)
    if sample_rate is not None:
        wrong = [t.name for t in tracks if t.sample_rate != sample_rate]
        if wrong:
            raise ValueError(
                f"{len(wrong)} track(s) are not at the model's {sample_rate} Hz (e.g. '{wrong[0]}'); "
                "resample the dataset first (MUSDB18-HQ is 44.1 kHz)"
            )
    settings_dict = settings.as_dict()
    results: list[TrackResult] = []
    bar = tqdm(tracks, desc="evaluate", unit="track", disable=not progress)
    for track in bar:
        bar.set_postfix_str(track.name[:30])
        record_path = out / "tracks" / f"{safe_name(track.name)}.json" if out else None
        stored = _load_record(record_path, settings_dict) if (record_path and resume) else None
        if stored is not None:
            saved = _load_estimates(out, track) if track.name in keep else None
            if track.name not in keep or saved is not None:
                log.debug("%s: reusing %s", track.name, record_path)
                results.append(TrackResult(stored["row"], stored["regions"], saved, resumed=True))
                continue
        result = _evaluate_one(separator, track, settings, out if save_estimates else None)
        if record_path is not None:
            record = dict(version=RESULT_VERSION, settings=settings_dict, row=result.row, regions=result.regions)
            _write_atomic(record_path, _dumps(record))
        if track.name not in keep:
            result.estimates = None
        results.append(result)
        log.info(
            "%s: cSDR %.2f dB, uSDR %.2f dB, leakage %.1f dB (%.1f s)",
            track.name, result.row["csdr"], result.row["usdr"], result.row["leakage_db"], result.row["seconds"],
        )  # fmt: skip
    summary = summarize(results)
    res = EvalResult(settings, results, summary, out)
    if out is not None:
        write_reports(res, out)
    return res


def _load_record(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        log.warning("%s: unreadable stored result (%s); recomputing", path, err)
        return None
    if record.get("version") != RESULT_VERSION or record.get("settings") != settings:
        log.info("%s: stored with other settings; recomputing", path.name)
        return None
    return record


def _estimate_folder(out: Path, track: Track) -> Path:
    return out / "estimates" / safe_name(track.name)


def _load_estimates(out: Path | None, track: Track) -> dict[str, torch.Tensor] | None:
    """Estimates saved by an earlier run (--save-estimates), or None."""
    if out is None:
        return None
    folder = _estimate_folder(out, track)
    paths = {name: folder / f"{name}.wav" for name in ("vocals", "instrumental")}
    if not all(p.is_file() for p in paths.values()):
        return None
    return {name: _match_length(read_audio(p)[0], track.frames) for name, p in paths.items()}


def _evaluate_one(separator: SeparatorLike, track: Track, settings: EvalSettings, est_dir: Path | None) -> TrackResult:
    start = time.perf_counter()
    stems = load_track(track)
    t0 = time.perf_counter()
    with torch.inference_mode():
        estimates = separator.separate(stems["mixture"], track.sample_rate)
    separate_s = time.perf_counter() - t0
    if "vocals" not in estimates:
        raise RuntimeError(f"the separator returned {sorted(estimates)} without 'vocals'; evaluate needs a vocal model")
    estimates = {k: _match_length(v.detach().float().cpu(), track.frames) for k, v in estimates.items()}
    if "instrumental" not in estimates:
        estimates["instrumental"] = stems["mixture"] - estimates["vocals"]
    row, regions = score_track(estimates, stems, track.sample_rate, settings.activity)
    if est_dir is not None:
        folder = _estimate_folder(est_dir, track)
        for name in ("vocals", "instrumental"):
            write_audio(folder / f"{name}.wav", estimates[name], track.sample_rate, subtype="FLOAT")
    row = dict(track=track.name, duration_s=track.duration, **row)
    row["separate_s"] = separate_s
    row["seconds"] = time.perf_counter() - start
    return TrackResult(row, regions, estimates)


# ---------------------------------------------------------------------------------------------------------------
# Aggregation and reports


def summarize(results: Sequence[TrackResult]) -> dict[str, Any]:
    """Dataset numbers: cSDR median over tracks, uSDR mean, plus the same for the instrumental and the leakage."""
    rows = [r.row for r in results]
    summary = metrics.aggregate(rows)
    inst = metrics.aggregate(
        [dict(csdr=r["instrumental_csdr"], usdr=r["instrumental_usdr"]) for r in rows if "instrumental_usdr" in r]
    )
    summary["instrumental_csdr"] = inst["csdr"]
    summary["instrumental_usdr"] = inst["usdr"]
    summary["audio_s"] = float(sum(r["duration_s"] for r in rows))
    summary["separate_s"] = float(sum(r.get("separate_s", 0.0) for r in rows))
    return summary


def _csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def _fmt(v: Any, digits: int = 2) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table; `columns` are (key, header) pairs."""
    cells = [[h for _, h in columns]] + [[_fmt(r.get(k, "")) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_summary(result: EvalResult) -> str:
    """Per-track table and the dataset line (Table II's numbers) as text."""
    s = result.summary
    per_track = format_table(
        result.rows,
        [("track", "track"), ("duration_s", "dur s"), ("csdr", "cSDR"), ("usdr", "uSDR"),
         ("leakage_db", "leak dB"), ("instrumental_csdr", "inst cSDR"), ("seconds", "time s")],
    )  # fmt: skip
    st = result.settings
    mode = f"{st.mode}, {st.segment:g} s segments" + (f", overlap {st.overlap:g}" if st.mode != "paper" else "")
    rt = s["separate_s"] / s["audio_s"] if s["audio_s"] else math.nan
    return (
        f"{per_track}\n\n"
        f"vocals over {s['tracks']} tracks ({mode}): cSDR {_fmt(s['csdr'])} dB (median of tracks), "
        f"uSDR {_fmt(s['usdr'])} dB (mean), leakage {_fmt(s.get('leakage_db', math.nan), 1)} dB\n"
        f"instrumental: cSDR {_fmt(s['instrumental_csdr'])} dB, uSDR {_fmt(s['instrumental_usdr'])} dB; "
        f"separation {_fmt(rt, 3)} s per audio second"
    )


def write_reports(result: EvalResult, out_dir: str | os.PathLike) -> None:
    """results.csv, results.json, summary.txt and by_vocal_segment.{csv,json} under `out_dir`."""
    out = Path(out_dir)
    _write_atomic(out / "results.csv", _csv_text(result.rows, TRACK_COLUMNS))
    _write_atomic(
        out / "results.json",
        _dumps(dict(settings=result.settings.as_dict(), summary=result.summary, tracks=result.rows)),
    )
    _write_atomic(out / "summary.txt", format_summary(result) + "\n")
    table = vocal_segment_table(result)
    _write_atomic(out / "by_vocal_segment.csv", _csv_text(table, ("bucket", "regions", "seconds", "usdr")))
    _write_atomic(
        out / "by_vocal_segment.json",
        _dumps(dict(activity=result.settings.activity.as_dict(), buckets=table, regions=result.regions)),
    )


def vocal_segment_table(result: EvalResult) -> list[dict[str, Any]]:
    """Table III: per duration bucket, mean uSDR over the vocal regions (of all tracks) in it."""
    return metrics.bucket_summary(result.regions)


def format_vocal_segment_table(table: Sequence[Mapping[str, Any]]) -> str:
    return format_table(
        table, [("bucket", "vocal segment"), ("regions", "regions"), ("seconds", "total s"), ("usdr", "uSDR")]
    )


# ---------------------------------------------------------------------------------------------------------------
# Table IV: input-length sweep


def segment_sweep(
    make_separator: Callable[[float], SeparatorLike],
    tracks: Sequence[Track],
    segments: Sequence[float],
    settings: EvalSettings,
    out_dir: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    sample_rate: int | None = None,
    done: Mapping[float, EvalResult] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate with each input length (the paper's Table IV); one row per segment length.

    Args:
        make_separator: segment seconds -> separator using that input length.
        segments: input lengths in seconds, e.g. (1, 2, 4, 8, 12, 16).
        settings: mode/overlap/activity used for every length (its `segment` is replaced).
        out_dir: each length writes its own report under ``out_dir/sweep/segment_<L>s/``.
        done: results already computed for some lengths with the same settings (not recomputed).
    Returns:
        rows with segment, csdr, usdr, leakage_db, tracks, separate_s; also written to ``out_dir/segment_sweep.*``.
    """
    if not segments:
        raise ValueError("give at least one segment length for the sweep, e.g. --segment-sweep 1 2 4 8 12 16")
    out = Path(out_dir) if out_dir is not None else None
    rows = []
    for seg in segments:
        st = replace(settings, segment=float(seg))
        sub = out / "sweep" / f"segment_{seg:g}s" if out else None
        res = (done or {}).get(float(seg))
        if res is None or res.settings != st:
            log.info("segment sweep: %g s", seg)
            res = evaluate_tracks(
                make_separator(float(seg)), tracks, st, sub, resume=resume, progress=progress, sample_rate=sample_rate
            )
        s = res.summary
        rows.append(
            dict(segment=float(seg), csdr=s["csdr"], usdr=s["usdr"], leakage_db=s.get("leakage_db", math.nan),
                 tracks=s["tracks"], separate_s=s["separate_s"])
        )  # fmt: skip
    if out is not None:
        cols = ("segment", "csdr", "usdr", "leakage_db", "tracks", "separate_s")
        _write_atomic(out / "segment_sweep.csv", _csv_text(rows, cols))
        _write_atomic(out / "segment_sweep.json", _dumps(dict(settings=settings.as_dict(), rows=rows)))
    return rows


def format_sweep_table(rows: Sequence[Mapping[str, Any]]) -> str:
    return format_table(
        rows, [("segment", "input s"), ("csdr", "cSDR"), ("usdr", "uSDR"), ("leakage_db", "leak dB"), ("tracks", "tracks")]
    )
