"""Training and validation datasets: the paper's random mixing, and aligned excerpts for validation.

Random mixing (training): each stem is drawn independently, from a random salient window of a random track; each
stem is silenced with probability 0.1 and scaled by a gain uniform in [0.5, 1.5]; the targets are the changed
stems; the mixture is their sum. Beyond the paper (off by default): each stem's polarity inverted, or its left and
right channels swapped, with a given probability, so that the model cannot tell a sound by its sign or its side.

Sample `i` of the training stream is a pure function of (seed, i): its random numbers come from a generator seeded
with both. Resuming a run, changing the number of worker processes, or changing the number of GPUs therefore does
not change which mixtures the model sees; only which process computes them. `StreamSampler` hands each process its
share of the global sample indices (like DistributedSampler, but endless and resumable at any step).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from bsmamba2.data.activity import detect_activity
from bsmamba2.data.musdb import Track, read_excerpt
from bsmamba2.trainconfig import SalienceConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Excerpt:
    track: Track
    start: int


class _StemExcerpts(Dataset):
    """What both datasets share: the stems that sum to the mixture, the targets among them, the excerpt size."""

    def __init__(self, stems: tuple[str, ...], targets: tuple[str, ...], segment: int, channels: int):
        missing = [t for t in targets if t not in stems]
        if missing:
            raise ValueError(f"target stems {missing} are not among the data stems {list(stems)}")
        self.stems = tuple(stems)
        self.target_index = [self.stems.index(t) for t in targets]
        self.segment = int(segment)
        self.channels = channels


class RandomMixDataset(_StemExcerpts):
    """Endless stream of random mixtures; `dataset[i]` is deterministic in (seed, i).

    Args:
        tracks: training tracks.
        starts: salient window starts, {track name: {stem: [start, ...]}} (see `detect_activity`).
        stems: all stems that make the mixture, e.g. ("vocals", "drums", "bass", "other").
        targets: the stems the model predicts, e.g. ("vocals",); a subset of `stems`.
        segment: excerpt length in samples.
        channels: audio channels of the excerpts.
        silence_prob: probability of silencing each stem.
        gain_range: (low, high) of the per-stem uniform gain.
        polarity_prob: probability of inverting each stem's polarity (0: the paper's recipe).
        channel_swap_prob: probability of swapping each stereo stem's two channels (0: the paper's recipe).
        seed: base seed of the stream.
    Item:
        mixture (channels, segment) float32, targets (len(targets), channels, segment) float32.
    """

    def __init__(
        self,
        tracks: list[Track],
        starts: dict[str, dict[str, list[int]]],
        stems: tuple[str, ...],
        targets: tuple[str, ...],
        segment: int,
        channels: int = 2,
        silence_prob: float = 0.1,
        gain_range: tuple[float, float] = (0.5, 1.5),
        seed: int = 0,
        polarity_prob: float = 0.0,
        channel_swap_prob: float = 0.0,
    ):
        super().__init__(stems, targets, segment, channels)
        for name, p in (("polarity_prob", polarity_prob), ("channel_swap_prob", channel_swap_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"data.{name} must be a probability in [0, 1], got {p}")
        self.silence_prob = float(silence_prob)
        self.gain_range = (float(gain_range[0]), float(gain_range[1]))
        self.polarity_prob, self.channel_swap_prob = float(polarity_prob), float(channel_swap_prob)
        self.seed = int(seed)
        # Per stem, every (track, salient start) pair: drawing uniformly from it draws a random track
        # (weighted by how much usable audio it has) and a random excerpt of it.
        self.pool: list[list[Excerpt]] = []
        for stem in self.stems:
            pool = [Excerpt(t, s) for t in tracks for s in starts.get(t.name, {}).get(stem, [])]
            if not pool:
                raise ValueError(
                    f"no salient {segment}-sample excerpt of stem {stem!r} in {len(tracks)} training tracks; "
                    "use longer tracks or a shorter data.segment_seconds"
                )
            self.pool.append(pool)

    def __len__(self) -> int:
        return 2**62  # an index space, not a size: the stream is endless

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(index)])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = self.rng(index)
        n = len(self.stems)
        # Draw every random number up front, so the stream does not depend on which stems were silenced.
        picks = [int(rng.integers(len(pool))) for pool in self.pool]
        silent = rng.random(n) < self.silence_prob
        gains = rng.uniform(self.gain_range[0], self.gain_range[1], size=n).astype(np.float32)
        # drawn after the paper's numbers, so that turning them on leaves every pick, silence and gain as it was
        gains[rng.random(n) < self.polarity_prob] *= -1
        swapped = (rng.random(n) < self.channel_swap_prob) & (self.channels == 2)
        sources = np.zeros((n, self.channels, self.segment), dtype=np.float32)  # (stems, channels, time)
        for k in range(n):
            if silent[k]:
                continue
            ex = self.pool[k][picks[k]]
            audio = read_excerpt(ex.track.path(self.stems[k]), ex.start, self.segment, self.channels)
            sources[k] = gains[k] * (audio[::-1] if swapped[k] else audio)
        mixture = sources.sum(axis=0)  # (channels, time)
        return torch.from_numpy(mixture), torch.from_numpy(sources[self.target_index].copy())


class AlignedDataset(_StemExcerpts):
    """Validation excerpts: the real stems of one track at one time, summed; no gains, no silencing.

    Excerpts are the windows where the first target stem is salient (every window of the track when none is),
    optionally thinned to `max_excerpts` evenly spaced ones, in track order: the set is the same on every run.
    Item: mixture (channels, segment), targets (len(targets), channels, segment).
    """

    def __init__(
        self,
        tracks: list[Track],
        starts: dict[str, dict[str, list[int]]],
        stems: tuple[str, ...],
        targets: tuple[str, ...],
        segment: int,
        channels: int = 2,
        max_excerpts: int | None = None,
    ):
        super().__init__(stems, targets, segment, channels)
        items: list[Excerpt] = []
        for track in tracks:
            track_starts = starts.get(track.name, {}).get(targets[0], [])
            if not track_starts:
                track_starts = list(range(0, track.frames - self.segment + 1, self.segment))
            items.extend(Excerpt(track, s) for s in track_starts)
        if max_excerpts is not None and len(items) > max_excerpts:
            keep = np.linspace(0, len(items) - 1, max_excerpts).round().astype(int)
            items = [items[i] for i in keep]
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        ex = self.items[index]
        sources = np.stack(
            [read_excerpt(ex.track.path(s), ex.start, self.segment, self.channels) for s in self.stems]
        )  # (stems, channels, time)
        return torch.from_numpy(sources.sum(axis=0)), torch.from_numpy(sources[self.target_index].copy())


class StreamSampler(Sampler[int]):
    """This process's indices of the global training stream, endless, starting at optimiser step `start_step`.

    Optimiser step s consumes global samples [s*E, (s+1)*E) with E = batch * world * accumulation; micro-batch m of
    rank r takes samples s*E + (m*world + r)*batch + [0, batch). Ranks thus never share a sample.
    """

    def __init__(self, batch: int, world: int = 1, rank: int = 0, accumulation: int = 1, start_step: int = 0):
        self.batch, self.world, self.rank, self.accumulation = batch, world, rank, accumulation
        self.start_step = start_step

    @property
    def effective_batch(self) -> int:
        return self.batch * self.world * self.accumulation

    def __iter__(self) -> Iterator[int]:
        step = self.start_step
        while True:
            base = step * self.effective_batch
            for m in range(self.accumulation):
                first = base + (m * self.world + self.rank) * self.batch
                yield from range(first, first + self.batch)
            step += 1

    def __len__(self) -> int:
        return 2**62


def build_datasets(split, data_cfg, targets: tuple[str, ...], channels: int, seed: int, workers: int = 0):
    """Training stream and validation set of a MUSDBSplit, detecting (or loading cached) source activity.

    Args:
        split: `bsmamba2.data.musdb.MUSDBSplit`.
        data_cfg: `bsmamba2.trainconfig.DataConfig`.
        targets: stems the model predicts.
        channels: audio channels the model takes.
        seed: the training stream's seed.
        workers: processes for activity detection.
    Returns:
        (RandomMixDataset, AlignedDataset or None when there are no validation tracks).
    """
    from bsmamba2.data.activity import default_cache_dir

    segment = int(round(data_cfg.segment_seconds * data_cfg.sample_rate))
    cfg: SalienceConfig = data_cfg.activity
    cache = data_cfg.cache_dir if data_cfg.cache_dir is not None else default_cache_dir(split.root)
    starts = detect_activity(split.train + split.valid, data_cfg.stems, segment, cfg, cache, workers=workers)
    train = RandomMixDataset(
        split.train,
        starts,
        data_cfg.stems,
        targets,
        segment,
        channels=channels,
        silence_prob=data_cfg.silence_prob,
        gain_range=(data_cfg.gain_min, data_cfg.gain_max),
        seed=seed,
        polarity_prob=data_cfg.polarity_prob,
        channel_swap_prob=data_cfg.channel_swap_prob,
    )
    valid = None
    if split.valid:
        valid = AlignedDataset(
            split.valid, starts, data_cfg.stems, targets, segment, channels, data_cfg.valid_max_excerpts
        )
    return train, valid
