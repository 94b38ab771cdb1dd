"""MUSDB layout and split, excerpt reads, source-activity detection and its cache, random mixing, the stream sampler."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from bsmamba2.data.activity import detect_activity, salient_starts
from bsmamba2.data.mixing import AlignedDataset, RandomMixDataset, StreamSampler, build_datasets
from bsmamba2.data.musdb import load_musdb, read_excerpt
from bsmamba2.trainconfig import PAPER_VALID_TRACKS, DataConfig, SalienceConfig

SR = 44100
STEMS = ("vocals", "drums", "bass", "other")


# ---------------------------------------------------------------- layout and reading


def test_paper_split_by_name(tiny_musdb):
    split = load_musdb(tiny_musdb)
    assert [t.name for t in split.train] == ["Cut A", "Cut B", "Cut C"]
    assert [t.name for t in split.valid] == ["Actions - One Minute Smile"]
    assert [t.name for t in split.test] == ["Cut D"]
    assert split.train[0].frames == int(2.5 * SR) and split.train[0].channels == 2
    assert len(PAPER_VALID_TRACKS) == 14 and len(set(PAPER_VALID_TRACKS)) == 14
    # nothing was moved on disk
    assert (tiny_musdb / "train" / "Actions - One Minute Smile" / "vocals.wav").is_file()


def test_explicit_split_and_valid_folder(tiny_musdb, tmp_path):
    split = load_musdb(tiny_musdb, valid_tracks=("Cut C",))
    assert [t.name for t in split.valid] == ["Cut C"]
    assert "Actions - One Minute Smile" in [t.name for t in split.train]
    assert load_musdb(tiny_musdb, valid_tracks=()).valid == []
    with pytest.raises(ValueError, match="not found"):
        load_musdb(tiny_musdb, valid_tracks=("No Such Song",))
    # a copy with a valid/ folder: that folder is the validation set and train/ is used whole
    root = tmp_path / "with_valid"
    shutil.copytree(tiny_musdb / "train", root / "train")
    shutil.move(str(root / "train" / "Cut C"), str(root / "valid" / "Cut C"))
    split = load_musdb(root)
    assert [t.name for t in split.valid] == ["Cut C"]
    assert [t.name for t in split.train] == ["Actions - One Minute Smile", "Cut A", "Cut B"]


def test_missing_root_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="MUSDB18-HQ root"):
        load_musdb(tmp_path)


def test_read_excerpt_equals_full_read(tiny_musdb):
    path = tiny_musdb / "train" / "Cut A" / "drums.wav"
    full, _ = sf.read(str(path), dtype="float32", always_2d=True)  # (time, channels)
    ex = read_excerpt(path, 12345, 20000)
    assert ex.shape == (2, 20000) and ex.dtype == np.float32
    np.testing.assert_array_equal(ex, full[12345:32345].T)
    # past the end: zero-padded
    tail = read_excerpt(path, len(full) - 100, 300)
    np.testing.assert_array_equal(tail[:, :100], full[-100:].T)
    assert not tail[:, 100:].any()


# ---------------------------------------------------------------- source activity


def _salient_reference(audio: np.ndarray, segment: int, cfg: SalienceConfig) -> list[int]:
    """Obvious twin of `salient_starts`: loop over windows, split into chunks, compare with the window quantile."""
    hop = int(round(segment * (1 - cfg.overlap)))
    chunk = segment // cfg.n_chunks
    out = []
    for start in range(0, audio.shape[1] - segment + 1, hop):
        ok = True
        for ch in audio:
            rms = np.array([np.sqrt(np.mean(ch[start + i * chunk : start + (i + 1) * chunk].astype(np.float64) ** 2))
                            for i in range(cfg.n_chunks)])
            rms[rms == 0] = cfg.eps
            thr = max(np.quantile(rms, cfg.quantile), cfg.rms_floor)
            ok &= np.mean(rms > thr) > cfg.min_active_fraction
        if ok:
            out.append(start)
    return out


def test_salient_starts_match_reference_on_real_audio(sample_track):
    audio = sf.read(str(sample_track / "vocals.wav"), dtype="float32", always_2d=True)[0].T.copy()
    audio[:, 2 * SR : 4 * SR] *= 1e-4  # a quiet stretch (-80 dB): windows over most of it are not salient
    cfg = SalienceConfig()
    got = salient_starts(audio, SR, cfg)
    assert got.tolist() == _salient_reference(audio, SR, cfg)
    assert 0 in got and 2 * SR not in got and int(2.5 * SR) not in got and 5 * SR in got


def test_salient_starts_edge_cases():
    cfg = SalienceConfig()
    assert salient_starts(np.zeros((2, 1000), np.float32), 44100, cfg).size == 0  # shorter than a window
    assert salient_starts(np.zeros((2, 3 * SR), np.float32), SR, cfg).size == 0  # digital silence
    rng = np.random.default_rng(0)
    noise = 0.1 * rng.standard_normal((2, 3 * SR)).astype(np.float32)
    assert salient_starts(noise, SR, cfg).tolist() == list(range(0, 2 * SR + 1, SR // 2))
    noise[1] = 0.0  # silent right channel: every channel must be active
    assert salient_starts(noise, SR, cfg).size == 0


def test_activity_cache_keyed_by_inputs(tiny_musdb, tmp_path):
    split = load_musdb(tiny_musdb)
    cache = tmp_path / "cache"
    first = detect_activity(split.train, STEMS, SR, SalienceConfig(), cache)
    files = list(cache.glob("activity-*.json"))
    assert len(files) == 1
    # Cut B's vocals are silent for 1.2 s: windows starting at 0 and 0.5 s are dropped, the others kept
    assert first["Cut B"]["vocals"] == [SR, int(1.5 * SR)]
    assert first["Cut B"]["drums"] == [0, SR // 2, SR, int(1.5 * SR)]
    # second call reads the cache (tamper with it to prove that)
    data = json.loads(files[0].read_text())
    data["starts"]["Cut A"]["bass"] = [7]
    files[0].write_text(json.dumps(data))
    assert detect_activity(split.train, STEMS, SR, SalienceConfig(), cache)["Cut A"]["bass"] == [7]
    # other settings or a changed file: another key, recomputed
    other = detect_activity(split.train, STEMS, SR, SalienceConfig(rms_floor=1e-2), cache)
    assert other["Cut A"]["bass"] != [7] and len(list(cache.glob("activity-*.json"))) == 2
    path = tiny_musdb / "train" / "Cut A" / "bass.wav"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert detect_activity(split.train, STEMS, SR, SalienceConfig(), cache)["Cut A"]["bass"] == first["Cut A"]["bass"]


# ---------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def activity(tiny_musdb, tmp_path_factory):
    split = load_musdb(tiny_musdb)
    return split, detect_activity(split.train + split.valid, STEMS, SR, SalienceConfig(), None)


def test_random_mix_is_paper_recipe(activity):
    split, starts = activity
    ds = RandomMixDataset(split.train, starts, STEMS, ("vocals",), SR, silence_prob=0.1, seed=3)
    for index in range(12):
        mix, tgt = ds[index]
        assert mix.shape == (2, SR) and tgt.shape == (1, 2, SR) and mix.dtype == torch.float32
        # rebuild the mixture from the draws: each stem from its own track/excerpt, gain in [0.5, 1.5], or silent
        rng = ds.rng(index)
        picks = [int(rng.integers(len(pool))) for pool in ds.pool]
        silent = rng.random(4) < 0.1
        gains = rng.uniform(0.5, 1.5, size=4).astype(np.float32)
        assert ((gains >= 0.5) & (gains <= 1.5)).all()
        expect = []
        for k, stem in enumerate(STEMS):
            ex = ds.pool[k][picks[k]]
            assert ex.start in starts[ex.track.name][stem]  # only salient windows
            audio = gains[k] * read_excerpt(ex.track.path(stem), ex.start, SR)
            expect.append(np.zeros_like(audio) if silent[k] else audio)
        np.testing.assert_allclose(tgt[0].numpy(), expect[0], atol=1e-7)
        np.testing.assert_allclose(mix.numpy(), np.sum(expect, axis=0), atol=1e-6)
    # deterministic in (seed, index), different across indices and seeds
    a, b = ds[5], ds[5]
    assert torch.equal(a[0], b[0])
    assert not torch.equal(ds[5][0], ds[6][0])
    ds2 = RandomMixDataset(split.train, starts, STEMS, ("vocals",), SR, seed=4)
    assert not torch.equal(ds[5][0], ds2[5][0])


def test_polarity_and_channel_swap_change_only_sign_and_side(activity):
    """The two augmentations beyond the paper: with probability 1 every stem is inverted (or its channels swapped),
    with every pick, silence and gain as without them; at 0.5 about half the stems are; 0 is the paper's stream."""
    split, starts = activity
    kw = dict(silence_prob=0.1, seed=3)
    plain = RandomMixDataset(split.train, starts, STEMS, ("vocals",), SR, **kw)
    zero = RandomMixDataset(split.train, starts, STEMS, ("vocals",), SR, polarity_prob=0.0, channel_swap_prob=0.0, **kw)
    inverted = RandomMixDataset(split.train, starts, STEMS, ("vocals",), SR, polarity_prob=1.0, **kw)
    swapped = RandomMixDataset(split.train, starts, STEMS, ("vocals",), SR, channel_swap_prob=1.0, **kw)
    half = RandomMixDataset(split.train, starts, STEMS, ("vocals",), SR, polarity_prob=0.5, channel_swap_prob=0.5,
                            **kw)
    seen = {"same": 0, "inverted": 0, "swapped": 0, "both": 0}
    for index in range(40):
        mix, tgt = plain[index]
        for a, b in zip(zero[index], (mix, tgt)):
            assert torch.equal(a, b)
        inv_mix, inv_tgt = inverted[index]
        assert torch.equal(inv_mix, -mix) and torch.equal(inv_tgt, -tgt)
        sw_mix, sw_tgt = swapped[index]
        assert torch.equal(sw_mix, mix.flip(0)) and torch.equal(sw_tgt, tgt.flip(1))
        h = half[index][1][0]  # the vocal target: one of the four forms of the plain one
        if not tgt.abs().sum():
            continue  # a silenced vocal looks the same in every form
        forms = {"same": tgt[0], "inverted": -tgt[0], "swapped": tgt[0].flip(0), "both": -tgt[0].flip(0)}
        seen[next(name for name, form in forms.items() if torch.equal(h, form))] += 1
    assert all(count >= 3 for count in seen.values()), seen
    with pytest.raises(ValueError, match="polarity_prob must be a probability"):
        RandomMixDataset(split.train, starts, STEMS, ("vocals",), SR, polarity_prob=1.5)


def test_random_mix_draws_stems_independently_and_silences_at_rate(activity):
    split, starts = activity
    ds = RandomMixDataset(split.train, starts, STEMS, ("vocals",), SR, silence_prob=0.1, seed=0)
    n, silent, same_track = 4000, 0, 0
    for index in range(n):
        rng = ds.rng(index)
        picks = [int(rng.integers(len(pool))) for pool in ds.pool]
        silent += int((rng.random(4) < 0.1).sum())
        same_track += ds.pool[0][picks[0]].track == ds.pool[1][picks[1]].track
    assert abs(silent / (4 * n) - 0.1) < 0.015
    assert same_track < 0.6 * n  # stems of one mixture mostly come from different songs


def test_random_mix_errors_without_salient_audio(activity):
    split, starts = activity
    with pytest.raises(ValueError, match="shorter data.segment_seconds"):
        long = detect_activity(split.train, STEMS, 10 * SR, SalienceConfig(), None)  # no 10-s window in 2.5 s
        RandomMixDataset(split.train, long, STEMS, ("vocals",), 10 * SR)
    with pytest.raises(ValueError, match="not among the data stems"):
        RandomMixDataset(split.train, starts, STEMS, ("piano",), SR)


def test_aligned_validation_excerpts(activity):
    split, starts = activity
    ds = AlignedDataset(split.valid, starts, STEMS, ("vocals",), SR)
    assert len(ds) == len(starts["Actions - One Minute Smile"]["vocals"]) == 4
    mix, tgt = ds[1]
    track = split.valid[0]
    parts = [read_excerpt(track.path(s), SR // 2, SR) for s in STEMS]
    np.testing.assert_array_equal(tgt[0].numpy(), parts[0])
    np.testing.assert_allclose(mix.numpy(), np.sum(parts, axis=0), atol=1e-6)
    assert len(AlignedDataset(split.valid, starts, STEMS, ("vocals",), SR, max_excerpts=2)) == 2
    with pytest.raises(ValueError, match="not among the data stems"):
        AlignedDataset(split.valid, starts, STEMS, ("piano",), SR)


def test_stream_sampler_partitions_the_global_stream():
    # one optimiser step = 12 samples; 2 ranks × batch 3 × accumulation 2 vs 1 rank × batch 3 × accumulation 4
    two = [StreamSampler(3, world=2, rank=r, accumulation=2, start_step=5) for r in range(2)]
    taken = [list(_take(s, 3 * 2 * 3)) for s in two]  # three steps each
    assert not set(taken[0]) & set(taken[1])
    assert sorted(taken[0] + taken[1]) == list(range(60, 96))
    one = list(_take(StreamSampler(3, world=1, rank=0, accumulation=4, start_step=5), 36))
    assert sorted(one) == list(range(60, 96))
    # resuming at step 6 continues exactly where step 5 ended
    assert list(_take(StreamSampler(3, 2, 1, 2, start_step=6), 6)) == taken[1][6:12]


def _take(it, n):
    out = []
    for x in it:
        out.append(x)
        if len(out) == n:
            return out
    return out


def test_build_datasets_and_loader_with_workers(tiny_musdb, tmp_path):
    cfg = DataConfig(root=str(tiny_musdb), segment_seconds=1.0, cache_dir=str(tmp_path))
    train, valid = build_datasets(load_musdb(tiny_musdb), cfg, ("vocals",), 2, seed=1)
    loader = torch.utils.data.DataLoader(train, batch_size=2, sampler=StreamSampler(2), num_workers=2)
    it = iter(loader)
    batches = [next(it) for _ in range(2)]
    del it
    assert batches[0][0].shape == (2, 2, SR) and batches[0][1].shape == (2, 1, 2, SR)
    # workers change nothing: the same samples as reading in this process
    assert torch.equal(batches[1][0][1], train[3][0])
    assert valid is not None and len(valid) == 4
