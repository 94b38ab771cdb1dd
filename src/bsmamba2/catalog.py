"""Catalog scale: separate a whole library on every GPU of every machine, with file I/O hidden behind the model.

    torchrun --nnodes N --nproc-per-node G -m bsmamba2 separate LIBRARY... -o OUT [the options of `separate`]

One process per GPU (`LOCAL_RANK` picks it). The processes share nothing but the job's own torch.distributed store
(the one torchrun's rendezvous already runs: no process group, no NCCL or gloo collective, no extra service), so the
same code runs CPU processes in the tests. A plain `bsmamba2 separate` is a world of one and keeps its simple
file-by-file loop; `--progress json` runs this engine in one process (an in-memory store).

Work assignment. Rank 0 lists the inputs, drops those a previous run finished (`separate.Manifest` rules: same input
hash, checkpoint and settings, outputs present), orders the rest longest first and publishes the list in the store.
Every worker thread of every process claims the next index with one atomic `store.add` on a shared counter, so uneven
lengths balance across processes and nodes, no file is claimed twice, and no extra service runs.

Inside one process. `workers` threads each run the ordinary per-file pipeline, `Separator.separate_file_result`
(decode, resample, cut into segments, overlap-add, resample back, encode, write to a temporary name and rename), whose
model call is swapped (`Separator.with_model_call`) for a hand-off to the batcher. The batcher, on the main thread,
pools the waiting segments of all workers into model calls of `batch_size` rows, so short files do not run
half-empty calls, and keeps two calls in flight on a GPU (pinned buffers, copies on a side stream): while the GPU
runs, the workers decode, blend, encode and write other files. Its time in the model over the wall time is the busy
fraction reported at the end.

Byte identity. A segment's result must not depend on what else shares its model call, or a file's bytes would depend
on timing. The choice: every model call has one shape (`batch_size` rows of one segment; zero rows pad the rare
short call), and the model treats batch rows independently (no batch statistics; band and time mixers reshape rows
apart). On CPU in float32 the tests check it bit for bit: a row alone, at any position, next to any other rows, gives
the same bits, and a 3-process job writes files byte-identical to a one-process `bsmamba2 separate` (whose last
call per file has fewer rows). On a GPU the same needs GEMM kernels that do not depend on the number of rows or a
row's position (a library may pick another algorithm or split for another shape): the CUDA test checks it in fp32
and `benchmarks/bench_catalog.py --check N` measures it for the paper-size model in bf16. Either way every output
is complete or absent: files are renamed into place only when whole.

Manifest. Each process appends one JSON line per event (start, done, failed, interrupted) to its own shard,
`OUT/.catalog/<job>-rank<R>.jsonl`, with one `write` call; rank 0 merges all shards into `OUT/manifest.json`
(temporary file and rename) at the end, and at the start of the next run, so the files a killed job finished count
as done and the rerun of the same command does only the rest. Entries are those of `separate.Manifest` plus rank,
host, job, attempts, output hashes, timing and error. OUT must be one folder that every machine sees, written by one
job at a time (a second job on it would redo work and lose manifest records, never leave a partial output).

Progress. Counters live in the store; rank 0 shows one bar over all processes (audio seconds, files, ETA) or prints
JSON lines (`--progress json`), the others stay quiet; a one-line summary ends the job. A file's error never stops
the job; the exit code is 1 if any file failed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

import torch
import torch.distributed as dist

from bsmamba2 import switches
from bsmamba2.audio import audio_info
from bsmamba2.pretrained import sha256_file
from bsmamba2.separate import MANIFEST_NAME, Manifest, Separator

log = logging.getLogger(__name__)

SHARD_DIR = ".catalog"
PROGRESS_MODES = ("bar", "json", "none")
STORE_PREFIX = "bsmamba2-catalog"
STORE_TIMEOUT = _dt.timedelta(days=7)  # waits on rank 0's plan and on the slowest process; torchrun ends dead jobs
POLL_S = 0.5
STALE_CALLS = 4  # a waiting row goes into the next call, full or not, once this many calls have passed it
JSON_EVERY_S = 10.0
# Test-only: "K" makes the process with the longest file SIGKILL itself mid-file once K files are done (`_TestKill`).
TEST_KILL_ENV = switches.CATALOG_TEST_KILL
COMMAND_LOGGER = "bsmamba2.separate"  # where `bsmamba2 separate` reports problems with its inputs


class Stopped(RuntimeError):
    """The job is being stopped (SIGTERM from torchrun, Ctrl-C): unfinished files are left for the rerun."""


# -- the job -----------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """This process's place in the job and the job's key-value store (torchrun's, or an in-process one)."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    store: dist.Store
    host: str = field(default_factory=socket.gethostname)
    stopping: threading.Event = field(default_factory=threading.Event, repr=False)  # set by SIGTERM / Ctrl-C
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def add(self, key: str, amount: int = 1) -> int:
        with self._lock:
            return int(self.store.add(key, int(amount)))

    def set(self, key: str, value: str) -> None:
        with self._lock:
            self.store.set(key, value)

    def get(self, key: str) -> str:
        """Wait for `key` (up to STORE_TIMEOUT) and return its value."""
        self.wait_until(lambda: self.store.check([key]), f"{key!r} in the job's store")
        with self._lock:
            return self.store.get(key).decode()

    def wait_until(self, ready: Callable[[], bool], what: str) -> None:
        """Poll `ready()` until true; raise `Stopped` if the job is stopping, RuntimeError after STORE_TIMEOUT."""
        deadline = time.monotonic() + STORE_TIMEOUT.total_seconds()
        while True:
            if self.stopping.is_set():
                raise Stopped("stopped while waiting for " + what)
            with self._lock:
                if ready():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}; is every process of the job still running?")
            time.sleep(0.05)


def launched() -> bool:
    """True inside a torchrun job (WORLD_SIZE set)."""
    return "WORLD_SIZE" in os.environ


def wanted(args: argparse.Namespace) -> bool:
    """Whether `bsmamba2 separate` runs this engine: under torchrun, or asked for with --progress json."""
    return launched() or getattr(args, "progress", "bar") == "json"


def join(args: argparse.Namespace | None = None) -> Job:
    """Join the torchrun job of this process (a world of one without torchrun) and pin its GPU.

    Under torchrun, `args.device` "auto"/"cuda" becomes "cuda:LOCAL_RANK" (one process per GPU); the store is the
    rendezvous store torchrun already runs. Processes other than rank 0 log only errors, and leave those about the
    inputs (a missing path, a template clash) to rank 0, which finds the same ones.
    """
    if not dist.is_available():
        raise ValueError("this PyTorch build has no torch.distributed, which the catalog engine needs for its store; "
                         "run `bsmamba2 separate` without torchrun and without --progress json")
    if launched():
        store, rank, world = next(dist.rendezvous("env://", timeout=STORE_TIMEOUT))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    else:
        store, rank, world, local_rank, local_world = dist.HashStore(), 0, 1, 0, 1
    store.set_timeout(STORE_TIMEOUT)
    # torchrun keeps its store across restarts (--max-restarts): each attempt counts from zero.
    prefix = f"{STORE_PREFIX}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    job = Job(rank, world, local_rank, local_world, dist.PrefixStore(prefix, store))
    if args is not None and torch.cuda.is_available() and str(getattr(args, "device", "auto")) in ("auto", "cuda"):
        if launched():
            torch.cuda.set_device(local_rank)
            args.device = f"cuda:{local_rank}"
    if not job.main:
        logging.getLogger("bsmamba2").setLevel(logging.ERROR)
        logging.getLogger(COMMAND_LOGGER).setLevel(logging.CRITICAL)  # until `run`
    return job


# -- the batcher: pools the segments of all workers into fixed-shape model calls ---------------------------------------
class _Request:
    """One worker's model call (rows of one (channels, time) shape), answered when every row has come back."""

    def __init__(self, x: torch.Tensor):
        self.x = x  # (rows, channels, time)
        self.out: list[torch.Tensor | None] = [None] * x.shape[0]
        self.left = x.shape[0]
        self.error: BaseException | None = None
        self.done = threading.Event()


@dataclass
class _InFlight:
    rows: list[tuple[_Request, int]]
    out: torch.Tensor  # (batch, stems, channels, time) on the CPU (pinned on a GPU), valid after `ready`
    cpu_s: float = 0.0  # CPU: seconds in the model call
    start: torch.cuda.Event | None = None  # GPU: around the model on the compute stream
    end: torch.cuda.Event | None = None
    ready: torch.cuda.Event | None = None  # GPU: the copy back is done


@dataclass
class BatcherStats:
    """What the model did in one process."""

    calls: int = 0
    rows: int = 0  # real segments
    pad_rows: int = 0  # zero rows filling short calls
    model_s: float = 0.0  # GPU: time between events around the model on the compute stream; CPU: wall
    starved_s: float = 0.0  # nothing in flight and no full call waiting: the model waited for the workers


class Batcher:
    """Run the model on segments handed in by worker threads, `batch_size` rows per call.

    `call(x)` is a drop-in model function for `Separator.with_model_call`: it blocks its worker until the rows
    are back. `run()` is the loop of the calling (main) thread; it returns when every worker has left.
    """

    def __init__(
        self, separator: Separator, batch_size: int | None = None, after_rows: Callable[[int], None] | None = None,
        stopping: threading.Event | None = None,
    ):  # fmt: skip
        self.separator = separator
        self.stopping = stopping or threading.Event()
        self.batch_size = int(batch_size or separator.batch_size)
        self.segment = separator.segment_samples  # rows of this length are padded to full calls
        self.cuda = separator.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(separator.device) if self.cuda else None
        self.after_rows = after_rows
        self.stats = BatcherStats()
        self._cond = threading.Condition()
        # (channels, time) -> rows waiting: (sequence number, model calls made before it came, request, row)
        self._pending: dict[tuple[int, int], deque[tuple[int, int, _Request, int]]] = {}
        self._n_pending = 0
        self._seq = 0
        self._live = 0  # workers that may still call
        self._waiting = 0  # workers blocked in `call`
        self._outstanding: set[_Request] = set()
        self._error: BaseException | None = None

    # -- worker side ---------------------------------------------------------------------------------------------
    def enter(self) -> None:
        with self._cond:
            self._live += 1

    def leave(self) -> None:
        with self._cond:
            self._live -= 1
            self._cond.notify_all()

    def call(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, channels, time) float32 -> (rows, stems, channels, time) float32 on the CPU."""
        req = _Request(x.to(torch.float32))
        key = (x.shape[1], x.shape[2])
        with self._cond:
            if self._error is not None:
                raise self._error
            queue = self._pending.setdefault(key, deque())
            for i in range(x.shape[0]):
                queue.append((self._seq, self.stats.calls, req, i))
                self._seq += 1
            self._n_pending += x.shape[0]
            self._waiting += 1
            self._outstanding.add(req)
            self._cond.notify_all()
        req.done.wait()
        if req.error is not None:
            raise req.error
        return torch.stack(req.out)  # type: ignore[arg-type]

    # -- main thread ---------------------------------------------------------------------------------------------
    def stop(self, error: BaseException) -> None:
        """Fail every unanswered and future call with `error` (the job is stopping)."""
        with self._cond:
            self._error = error
            for req in list(self._outstanding):
                self._answer_error(req, error)
            self._pending.clear()
            self._n_pending = 0
            self._cond.notify_all()

    def run(self) -> None:
        """Serve the workers until all have left; raise `Stopped` once `stopping` is set (calls then fail)."""
        inflight: _InFlight | None = None
        try:
            while True:
                rows = None
                with self._cond:
                    while True:
                        if self.stopping.is_set():
                            raise Stopped("stopped by a signal")
                        if self._error is not None:
                            raise self._error
                        rows = self._take(full_only=True)
                        if rows or inflight is not None:
                            break  # launch a full call, or collect the one in flight (its workers then go on)
                        if self._n_pending and self._waiting >= self._live:
                            rows = self._take(full_only=False)  # every worker waits on the model: run what there is
                            break
                        if self._live == 0 and not self._n_pending:
                            return
                        t = time.perf_counter()
                        self._cond.wait(POLL_S)
                        self.stats.starved_s += time.perf_counter() - t
                call = self._guarded(self._launch, rows) if rows else None
                if inflight is not None:
                    self._guarded(self._deliver, inflight)
                inflight = call
        except BaseException as err:
            self.stop(err if isinstance(err, Exception) else Stopped(f"stopped ({type(err).__name__})"))
            raise

    def _guarded(self, step: Callable, arg):
        """Run a launch or delivery; if the model fails, the files of those rows fail and the job goes on."""
        try:
            return step(arg)
        except Exception as err:  # noqa: BLE001 - reported per file by the workers
            rows = arg.rows if isinstance(arg, _InFlight) else arg
            log.debug("model call failed: %s", err)
            with self._cond:
                for req, _ in rows:
                    self._answer_error(req, err)
                self._cond.notify_all()
            return None

    def _take(self, full_only: bool) -> list[tuple[_Request, int]] | None:
        """Pop up to `batch_size` rows of one shape: a full call, or the oldest row's shape when `full_only` is
        false or that row has waited STALE_CALLS calls (a rare shape, e.g. a mono file's last rows, is not starved)."""
        if not self._n_pending:
            return None
        _, calls, key = min((q[0][0], q[0][1], k) for k, q in self._pending.items())
        if full_only and self.stats.calls - calls < STALE_CALLS:
            keys = [k for k, q in self._pending.items() if len(q) >= self.batch_size]
            if not keys:
                return None
            key = keys[0]
        queue = self._pending[key]
        rows = [queue.popleft()[2:] for _ in range(min(self.batch_size, len(queue)))]
        if not queue:
            del self._pending[key]
        self._n_pending -= len(rows)
        return rows  # type: ignore[return-value]

    def _launch(self, rows: list[tuple[_Request, int]]) -> _InFlight:
        channels, length = rows[0][0].x.shape[1:]
        n = self.batch_size if length == self.segment else len(rows)  # whole-file rows (segment 0) are not padded
        x = torch.empty(n, channels, length, pin_memory=self.cuda)
        for i, (req, j) in enumerate(rows):
            x[i].copy_(req.x[j])
        x[len(rows) :].zero_()
        self.stats.calls += 1
        self.stats.rows += len(rows)
        self.stats.pad_rows += n - len(rows)
        if not self.cuda:
            t = time.perf_counter()
            y = self.separator.apply_on_device(x)
            return _InFlight(rows, y, cpu_s=time.perf_counter() - t)
        # Copies run on a side stream, so the copy in of this call and the copy out of the last one overlap the
        # model's work on the compute stream; `record_stream` keeps each buffer alive until the other stream is done.
        device = self.separator.device
        with torch.cuda.device(device):
            compute = torch.cuda.current_stream(device)
            copy = self._copy_stream
            loaded, start, end, ready = (torch.cuda.Event(enable_timing=t) for t in (False, True, True, False))
            with torch.cuda.stream(copy):
                x_dev = x.to(device, non_blocking=True)
                loaded.record(copy)
            compute.wait_event(loaded)
            x_dev.record_stream(compute)
            start.record(compute)
            y = self.separator.apply_on_device(x_dev)
            end.record(compute)
            out = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
            copy.wait_event(end)
            with torch.cuda.stream(copy):
                out.copy_(y, non_blocking=True)
                ready.record(copy)
            y.record_stream(copy)
        return _InFlight(rows, out, start=start, end=end, ready=ready)

    def _deliver(self, call: _InFlight) -> None:
        if call.ready is not None:
            call.ready.synchronize()
            self.stats.model_s += call.start.elapsed_time(call.end) / 1000.0
        else:
            self.stats.model_s += call.cpu_s
        with self._cond:
            for i, (req, j) in enumerate(call.rows):
                req.out[j] = call.out[i]
                req.left -= 1
                if req.left == 0:
                    self._waiting -= 1
                    self._outstanding.discard(req)
                    req.done.set()
            self._cond.notify_all()
        if self.after_rows is not None:
            self.after_rows(len(call.rows))

    def _answer_error(self, req: _Request, error: BaseException) -> None:
        """Fail a request that is not answered yet (call with the condition held)."""
        if not req.done.is_set():
            req.error = error
            self._waiting -= 1
            req.left = 0
            self._outstanding.discard(req)
            req.done.set()


class _TestKill:
    """Test-only, TEST_KILL_ENV="K": the process that claims the plan's first (longest) file SIGKILLs itself when
    segments come back to it once K files of the job are done, so it dies mid-file while others are finished."""

    def __init__(self, job: Job, count: int):
        self.job, self.count, self.armed = job, count, False

    @classmethod
    def from_env(cls, job: Job) -> "_TestKill | None":
        spec = switches.catalog_test_kill()
        return cls(job, int(spec)) if spec else None

    def claimed(self, index: int) -> None:
        self.armed = self.armed or index == 0

    def after_rows(self, n: int) -> None:
        if self.armed and self.job.add("files_ok", 0) >= self.count:
            log.error("%s: rank %d kills itself mid-file (test hook)", TEST_KILL_ENV, self.job.rank)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)


# -- the manifest: per-process shards, merged by rank 0 ----------------------------------------------------------------
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class Shard:
    """This process's append-only manifest shard: one JSON line per event, each written with one `write` call."""

    def __init__(self, out_dir: Path, job_id: str, rank: int):
        self.path = self.path_of(out_dir, job_id, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lock = threading.Lock()

    @staticmethod
    def path_of(out_dir: str | os.PathLike, job_id: str, rank: int) -> Path:
        return Path(out_dir) / SHARD_DIR / f"{job_id}-rank{rank:05d}.jsonl"

    def write(self, key: str, durable: bool = False, **record) -> None:
        line = (json.dumps({"key": key, **record}, sort_keys=True) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)
            if durable:
                os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def merge_shards(out_dir: str | os.PathLike) -> int:
    """Fold every shard under `out_dir/.catalog` into `out_dir/manifest.json` (atomically) and delete the shards.

    A "running" record starts a new attempt (it replaces the file's entry and counts in its "attempts"); later
    records update it. A torn last line (a killed process) is skipped. Returns the number of records merged.
    """
    folder = Path(out_dir) / SHARD_DIR
    shards = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    if not shards:
        return 0
    manifest = Manifest(out_dir)
    count = 0
    for shard in shards:  # names sort by job start, then rank; one file is in one shard per job
        for line in shard.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
                key = record.pop("key")
            except (ValueError, KeyError, AttributeError):
                continue
            if record.get("status") == "running":  # a new attempt: nothing of an earlier one stays
                record["attempts"] = int(manifest.files.get(key, {}).get("attempts", 0)) + 1
                manifest.files[key] = record
            else:
                manifest.files.setdefault(key, {}).update(record)
            count += 1
    manifest.save()
    for shard in shards:
        shard.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass
    return count


def remove_stale_parts(targets: dict[str, Path]) -> None:
    """Delete temporary outputs (`AudioWriter`'s hidden .part files) that a killed process left for these targets."""
    for target in targets.values():
        if target.parent.is_dir():
            for part in target.parent.glob(f".{target.name}.*.part"):
                part.unlink(missing_ok=True)


# -- planning (rank 0) -------------------------------------------------------------------------------------------------
@dataclass
class Options:
    """The per-file options of `bsmamba2 separate` and the settings recorded in the manifest."""

    out_dir: Path
    settings: dict
    template: str
    format: str = "wav"
    subtype: str | None = None
    sample_rate: int | None = None
    downmix: bool = False
    stems: list[str] | None = None
    bitrate: int | None = None
    overwrite: bool = False

    def outputs(self, separator: Separator, path: Path) -> dict[str, Path]:
        return separator.output_paths(path, self.out_dir, self.template, self.format, self.stems)


def plan(separator: Separator, files: list[Path], options: Options, threads: int = 16) -> dict:
    """Merge leftover shards, then list the files still to do, longest first: {"todo": [[path, seconds], ...],
    "skipped": n}. Unreadable files get -1 s (last); their worker records the error."""
    merge_shards(options.out_dir)
    manifest = Manifest(options.out_dir)
    checkpoint_sha256 = separator.checkpoint_sha256

    def probe(path: Path) -> tuple[str, float] | None:
        outputs = options.outputs(separator, path)
        if not options.overwrite and all(p.exists() for p in outputs.values()):
            entry = manifest.get(path)
            try:
                if entry is None or manifest.is_done(
                    path, manifest.input_sha256(path), checkpoint_sha256, options.settings, outputs
                ):
                    return None
            except OSError:
                pass
        try:
            seconds = audio_info(path).duration
        except (ValueError, OSError):
            seconds = -1.0
        return str(path), seconds

    with ThreadPoolExecutor(max(1, threads)) as pool:
        probed = list(pool.map(probe, files))
    todo = [p for p in probed if p is not None]
    todo.sort(key=lambda item: (-item[1], item[0]))
    return {"todo": todo, "skipped": len(probed) - len(todo)}


# -- one process's work ------------------------------------------------------------------------------------------------
@dataclass
class RankStats:
    """Totals of one process; `busy` = model time / wall time."""

    rank: int = 0
    host: str = ""
    device: str = ""
    wall_s: float = 0.0
    files: int = 0
    audio_s: float = 0.0
    model_s: float = 0.0
    starved_s: float = 0.0
    worker_wait_s: float = 0.0  # workers blocked on the model
    worker_io_s: float = 0.0  # workers decoding, resampling, blending, encoding, writing (wall, all workers)
    hash_s: float = 0.0
    calls: int = 0
    rows: int = 0
    pad_rows: int = 0
    workers: int = 0

    @property
    def busy(self) -> float:
        return self.model_s / self.wall_s if self.wall_s else 0.0


class _Counters:
    """Job-wide progress counters in the store, with this process's audio seconds flushed every POLL_S."""

    def __init__(self, job: Job):
        self.job = job
        self._lock = threading.Lock()
        self._ms = 0.0
        self._last = time.monotonic()

    def audio(self, seconds: float, flush: bool = False) -> None:
        with self._lock:
            self._ms += seconds * 1000.0
            if not flush and time.monotonic() - self._last < POLL_S:
                return
            ms, self._ms = int(self._ms), self._ms - int(self._ms)
            self._last = time.monotonic()
        if ms:
            self.job.add("audio_ms", ms)


def default_workers(separator: Separator, job: Job) -> int:
    """Decode/write threads per process: 2 on a CPU (the model needs the cores), else the cores per GPU (2..8)."""
    if separator.device.type == "cpu":
        return 2
    return max(2, min(8, (os.cpu_count() or 4) // max(1, job.local_world)))


def work(job: Job, separator: Separator, options: Options, todo: list[list], job_id: str,
         workers: int | None = None) -> RankStats:  # fmt: skip
    """Run this process's share of `todo` (claimed one by one from the store) until none is left."""
    start = time.perf_counter()
    workers = int(workers or default_workers(separator, job))
    test_kill = _TestKill.from_env(job)
    batcher = Batcher(separator, after_rows=test_kill.after_rows if test_kill else None, stopping=job.stopping)
    shard = Shard(options.out_dir, job_id, job.rank)
    prior = Manifest(options.out_dir)  # read-only here: input hashes of unchanged files are reused
    counters = _Counters(job)
    stats = RankStats(rank=job.rank, host=job.host, device=str(separator.device), workers=workers)
    stats_lock = threading.Lock()
    stop = threading.Event()
    common = {
        "rank": job.rank, "host": job.host, "job": job_id, "checkpoint_sha256": separator.checkpoint_sha256,
        "checkpoint": str(separator.checkpoint_path) if separator.checkpoint_path else None,
        "settings": options.settings,
    }  # fmt: skip

    def one(path: Path, planned_s: float) -> None:
        key = Manifest.key(path)
        t0 = time.perf_counter()
        waited = hashed = 0.0
        reported = 0.0

        def model_call(x: torch.Tensor) -> torch.Tensor:
            nonlocal waited
            t = time.perf_counter()
            try:
                return batcher.call(x)
            finally:
                waited += time.perf_counter() - t

        def progress(seconds: float) -> None:
            nonlocal reported
            reported += seconds
            counters.audio(seconds)

        try:
            targets = options.outputs(separator, path)
            remove_stale_parts(targets)
            shard.write(key, status="running", started=_now(), error=None, **common)
            t = time.perf_counter()
            input_sha256 = prior.input_sha256(path)
            st = path.stat()
            hashed += time.perf_counter() - t
            result = separator.with_model_call(model_call).separate_file_result(
                path, options.out_dir, template=options.template, format=options.format, subtype=options.subtype,
                sample_rate=options.sample_rate, downmix=options.downmix, stems=options.stems, progress=progress,
                bitrate=options.bitrate,
            )  # fmt: skip
            t = time.perf_counter()
            output_sha256 = {stem: sha256_file(p) for stem, p in result.outputs.items()}
            hashed += time.perf_counter() - t
            shard.write(
                key, durable=True, status="done", finished=_now(), input_sha256=input_sha256, size=st.st_size,
                mtime_ns=st.st_mtime_ns, outputs={k: str(v) for k, v in result.outputs.items()},
                output_sha256=output_sha256, duration_s=round(result.duration, 3),
                elapsed_s=round(time.perf_counter() - t0, 3), rtf=round(result.rtf, 4), model_wait_s=round(waited, 3),
                hash_s=round(hashed, 3),
            )  # fmt: skip
            job.add("files_ok")
            with stats_lock:
                stats.files += 1
                stats.audio_s += result.duration
            log.debug("%s: %.1f s of audio in %.1f s on rank %d", path, result.duration, result.elapsed, job.rank)
        except Exception as err:  # noqa: BLE001 - one file's error never stops the job
            if stop.is_set() or isinstance(err, Stopped):
                shard.write(key, status="interrupted", finished=_now(), error=str(err) or "stopped")
                return
            message = str(err) or type(err).__name__
            if str(path) not in message:
                message = f"{path}: {message}"
            log.error("error: %s", message)
            shard.write(key, durable=True, status="failed", finished=_now(), error=message,
                        elapsed_s=round(time.perf_counter() - t0, 3))  # fmt: skip
            job.add("files_failed")
        finally:
            counters.audio(max(0.0, planned_s) - reported if planned_s > reported else 0.0, flush=True)
            with stats_lock:
                stats.worker_wait_s += waited
                stats.hash_s += hashed
                stats.worker_io_s += time.perf_counter() - t0 - waited - hashed

    def worker() -> None:
        try:
            while not stop.is_set() and not job.stopping.is_set():
                index = job.add("next") - 1
                if index >= len(todo):
                    break
                if test_kill is not None:
                    test_kill.claimed(index)
                path, seconds = todo[index]
                one(Path(path), float(seconds))
        except Exception as err:  # noqa: BLE001 - a store failure: let the main thread report it
            log.error("error: worker on rank %d stopped: %s", job.rank, err)
        finally:
            batcher.leave()

    threads = torch.get_num_threads()
    if separator.device.type == "cuda":  # the workers' CPU ops: a few threads each, not a team each per core
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) // max(1, job.local_world * workers))))
    pool = []
    for i in range(workers):
        batcher.enter()
        thread = threading.Thread(target=worker, name=f"catalog-worker-{i}", daemon=True)
        thread.start()
        pool.append(thread)
    try:
        batcher.run()
    except BaseException as err:
        stop.set()
        batcher.stop(Stopped(f"stopped ({type(err).__name__})"))
        raise
    finally:
        for thread in pool:  # each aborts its file (no partial output) and records it as interrupted
            thread.join(timeout=30)
        shard.close()
        counters.audio(0.0, flush=True)
        torch.set_num_threads(threads)
    stats.wall_s = time.perf_counter() - start
    b = batcher.stats
    stats.model_s, stats.starved_s, stats.calls, stats.rows, stats.pad_rows = (
        b.model_s, b.starved_s, b.calls, b.rows, b.pad_rows,
    )  # fmt: skip
    return stats


# -- the whole job -----------------------------------------------------------------------------------------------------
@dataclass
class Report:
    """The job's outcome, the same on every process."""

    files_total: int
    ok: int
    failed: int
    skipped: int
    audio_s: float
    wall_s: float
    world: int
    ranks: list[dict]
    manifest: str

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    @property
    def audio_s_per_s_per_gpu(self) -> float:
        return self.audio_s / self.wall_s / self.world if self.wall_s else 0.0

    @property
    def busy(self) -> float:
        """Mean over processes of time in the model / wall time."""
        busy = [r["model_s"] / r["wall_s"] for r in self.ranks if r.get("wall_s")]
        return sum(busy) / len(busy) if busy else 0.0

    def line(self) -> str:
        unit = "GPU" if all(str(r.get("device", "")).startswith("cuda") for r in self.ranks) else "process"
        units = unit if self.world == 1 else {"GPU": "GPUs", "process": "processes"}[unit]
        return (
            f"{self.ok} separated, {self.failed} failed, {self.skipped} skipped of {self.files_total} files; "
            f"{self.audio_s / 3600:.3f} h of audio in {self.wall_s:.1f} s on {self.world} {units}: "
            f"{self.audio_s_per_s_per_gpu:.1f} audio-s/s per {unit}, model busy {100 * self.busy:.0f}%; "
            f"manifest: {self.manifest}"
        )

    def as_dict(self) -> dict:
        return asdict(self) | {"exit_code": self.exit_code, "busy": round(self.busy, 4),
                               "audio_s_per_s_per_gpu": round(self.audio_s_per_s_per_gpu, 3)}  # fmt: skip


class _Progress:
    """Rank 0's view of the whole job from the store: a tqdm bar, JSON lines, or nothing."""

    def __init__(self, job: Job, mode: str, files: int, skipped: int, audio_total: float, stream: IO[str],
                 failed_inputs: int = 0):  # fmt: skip
        self.job, self.mode, self.files, self.skipped, self.total = job, mode, files, skipped, audio_total
        self.failed_inputs = failed_inputs  # inputs that never reached the plan (missing paths)
        self.stream = stream
        self.start = time.perf_counter()
        self._stop = threading.Event()
        self._bar = None
        self._last_files: tuple[int, int] = (-1, -1)
        self._last_audio = -1.0
        self._last_line = 0.0
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=round(audio_total, 1), unit="audio-s", desc="catalog", dynamic_ncols=True,
                             bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} audio-s [{elapsed}<{remaining}{postfix}]")
        self._thread = threading.Thread(target=self._loop, name="catalog-progress", daemon=True)

    def snapshot(self) -> dict:
        ok, failed = self.job.add("files_ok", 0), self.job.add("files_failed", 0) + self.failed_inputs
        done_s = min(self.total, self.job.add("audio_ms", 0) / 1000.0)
        elapsed = time.perf_counter() - self.start
        rate = done_s / elapsed if elapsed > 0 else 0.0
        return {
            "event": "progress", "files_total": self.files + self.skipped + self.failed_inputs, "files_ok": ok,
            "files_failed": failed,
            "files_skipped": self.skipped, "audio_s_done": round(done_s, 1), "audio_s_total": round(self.total, 1),
            "elapsed_s": round(elapsed, 1), "audio_s_per_s": round(rate, 2),
            "eta_s": round((self.total - done_s) / rate, 1) if rate > 0 else None,
        }  # fmt: skip

    def _show(self) -> None:
        snap = self.snapshot()
        if self._bar is not None:
            self._bar.n = snap["audio_s_done"]
            ended, files = snap["files_ok"] + snap["files_failed"], self.files + self.failed_inputs
            self._bar.set_postfix_str(
                f"files {ended}/{files} failed {snap['files_failed']} "
                f"{snap['audio_s_done'] / 3600:.2f}/{self.total / 3600:.2f} h", refresh=False)  # fmt: skip
            self._bar.refresh()
        elif self.mode == "json":  # a line when a file finishes, else every JSON_EVERY_S while audio progresses
            files = (snap["files_ok"], snap["files_failed"])
            now = time.monotonic()
            moved = snap["audio_s_done"] != self._last_audio and now - self._last_line >= JSON_EVERY_S
            if files != self._last_files or moved:
                self._last_files, self._last_audio, self._last_line = files, snap["audio_s_done"], now
                print(json.dumps(snap), file=self.stream, flush=True)

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S * 2):
            try:
                self._show()
            except Exception:  # noqa: BLE001 - progress must never end the job
                return

    def __enter__(self) -> "_Progress":
        if self.mode != "none":
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if exc[0] is None and self.mode != "none":
            self._show()
        if self._bar is not None:
            if exc[0] is None:  # every file ended: the estimate of the last one's length no longer matters
                self._bar.n = self._bar.total
                self._bar.refresh()
            self._bar.close()


def separate_catalog(
    separator: Separator, files: list[Path], options: Options, job: Job | None = None, workers: int | None = None,
    progress: str = "bar", stream: IO[str] | None = None, failed_inputs: int = 0,
) -> Report:  # fmt: skip
    """Separate `files` with every process of `job` (default: a world of one); every process calls this.

    Args:
        separator: this process's separator (on its GPU).
        files: the inputs (each process passes the same list; rank 0's is used).
        options: output options and the settings recorded in the manifest.
        workers: decode/write threads per process (default `default_workers`).
        progress: "bar", "json" (lines on `stream`, default stdout) or "none"; only rank 0 shows it.
        failed_inputs: inputs that already failed before (missing paths), counted as failed.
    Returns:
        the job's `Report` (on every process).
    """
    job = job or join()
    stream = stream or sys.stdout
    start = time.perf_counter()
    if job.main:
        todo = plan(separator, files, options)
        job_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        job.set("plan", json.dumps({"job": job_id, **todo}))
    else:
        todo = json.loads(job.get("plan"))
        job_id = todo["job"]
    items = todo["todo"]
    # Every process starts claiming together, so a process that loads its model late still gets its share.
    job.add("ready")
    job.wait_until(lambda: job.store.add("ready", 0) >= job.world, "every process to start")
    total_audio = sum(max(0.0, s) for _, s in items)
    if job.main:
        log.info("catalog job %s: %d file(s) to separate (%.2f h of audio), %d skipped, on %d process(es)", job_id,
                 len(items), total_audio / 3600, todo["skipped"], job.world)  # fmt: skip
    separator.plan_compile(total_audio)  # this process's model calls: compiled for a long library on a CPU
    show = progress if job.main else "none"
    with _Progress(job, show, len(items), todo["skipped"], total_audio, stream, failed_inputs):
        if show == "bar":
            from tqdm.contrib.logging import logging_redirect_tqdm

            with logging_redirect_tqdm():
                stats = work(job, separator, options, items, job_id, workers)
        else:
            stats = work(job, separator, options, items, job_id, workers)
        job.set(f"stats/{job.rank}", json.dumps(asdict(stats)))
        job.add("ranks_done")
        if job.main:
            job.wait_until(lambda: job.store.add("ranks_done", 0) >= job.world, "every process to finish")
            unseen = [r for r in range(job.world) if not Shard.path_of(options.out_dir, job_id, r).exists()]
            if unseen:
                log.warning("the manifest shards of rank(s) %s are not visible here: -o %s must be a folder that every "
                            "machine of the job sees (a shared file system), or their files will be redone",
                            unseen, options.out_dir)  # fmt: skip
            merge_shards(options.out_dir)
            ranks = [json.loads(job.get(f"stats/{r}")) for r in range(job.world)]
            report = Report(
                files_total=len(items) + todo["skipped"] + failed_inputs, ok=job.add("files_ok", 0),
                failed=job.add("files_failed", 0) + failed_inputs, skipped=todo["skipped"],
                audio_s=sum(r["audio_s"] for r in ranks), wall_s=time.perf_counter() - start, world=job.world,
                ranks=ranks, manifest=str(Path(options.out_dir) / MANIFEST_NAME),
            )  # fmt: skip
            job.set("report", json.dumps(asdict(report)))
    if not job.main:
        report = Report(**json.loads(job.get("report")))
    return report


def run(job: Job, args: argparse.Namespace, separator: Separator, files: list[Path], failures: list, settings: dict,
        stream: IO[str] | None = None) -> int:  # fmt: skip
    """`bsmamba2 separate` under torchrun (or with --progress json): the catalog engine; returns the exit code."""
    options = Options(
        out_dir=args.out_dir, settings=settings, template=args.template, format=args.format,
        subtype=settings.get("subtype"), sample_rate=args.sample_rate, downmix=args.downmix,
        stems=settings.get("stems"), bitrate=settings.get("bitrate"), overwrite=args.overwrite,
    )  # fmt: skip
    progress = getattr(args, "progress", "bar")
    if args.quiet and progress == "bar":
        progress = "none"
    stream = stream or sys.stdout
    if not job.main:
        logging.getLogger(COMMAND_LOGGER).setLevel(logging.NOTSET)

    def on_signal(signum, frame):  # torchrun stops the other processes of a failed job with SIGTERM
        job.stopping.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_signal)
    try:
        report = separate_catalog(separator, files, options, job, progress=progress, stream=stream,
                                  failed_inputs=len(failures))  # fmt: skip
    except Stopped as err:
        log.error("%s: unfinished files are left for the rerun (rank %d)", err, job.rank)
        return 143
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if job.main:
        log.log(logging.WARNING if report.failed else logging.INFO, "%s", report.line())
        if progress == "json":
            print(json.dumps({"event": "summary", **report.as_dict()}), file=stream, flush=True)
    return report.exit_code
