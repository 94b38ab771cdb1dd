"""The procedural song generator and `bsmamba2 synth`: sums, determinism, labels vs energy, levels, singing, layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from scipy import signal

from bsmamba2.cli import main
from bsmamba2.data.musdb import load_musdb
from bsmamba2.data.synth import (ACTIVITIES, BASS_KINDS, HARD_LEAD_KINDS, MODES, REGIONS_FILENAME, STEMS, VOICE_TYPES, VOWELS,
                                 Song, SynthDataset, _sing_segment, generate_song)

SR = 44100


@pytest.fixture(scope="module")
def songs() -> dict[str, list[Song]]:
    """Three 8-second songs per activity pattern."""
    return {a: [generate_song(seed, 8.0, a) for seed in (11, 12, 13)] for a in ACTIVITIES}


def _frame_rms(x: np.ndarray, hop: int = 441) -> np.ndarray:
    """(channels, time) -> (frames,) RMS over channels in hop-sized frames."""
    n = x.shape[-1] // hop * hop
    return np.sqrt(np.mean(x[:, :n].reshape(x.shape[0], -1, hop) ** 2, axis=(0, 2)))


def test_stems_sum_to_mixture_with_expected_shapes(songs):
    for song in sum(songs.values(), []):
        assert set(song.stems) == set(STEMS)
        assert song.mixture.shape == (2, 8 * SR) and song.mixture.dtype == np.float32
        total = np.zeros_like(song.mixture)
        for name in STEMS:
            stem = song.stems[name]
            assert stem.shape == song.mixture.shape and stem.dtype == np.float32
            assert np.isfinite(stem).all()
            total += stem
        np.testing.assert_allclose(total, song.mixture, atol=1e-6)


def test_same_seed_same_song_other_seed_other_song():
    a = generate_song(5, 3.0, "mixed")
    b = generate_song(5, 3.0, "mixed")
    c = generate_song(6, 3.0, "mixed")
    for name in STEMS:
        np.testing.assert_array_equal(a.stems[name], b.stems[name])
    assert a.vocal_regions == b.vocal_regions and a.info == b.info
    assert not np.array_equal(a.mixture, c.mixture)
    # A sequence seed is a different stream from its first element.
    assert not np.array_equal(generate_song((5, 0), 3.0).mixture, a.mixture)


def test_levels_do_not_clip_and_vocals_sit_near_the_accompaniment(songs):
    for song in sum(songs.values(), []):
        peak = np.abs(song.mixture).max()
        assert 0.3 <= peak < 1.0
        for name in STEMS:
            assert np.abs(song.stems[name]).max() < 1.0
        mask = song.vocal_mask()
        accomp = song.stems["drums"] + song.stems["bass"] + song.stems["other"]
        v = np.sqrt(np.mean(song.stems["vocals"][:, mask] ** 2))
        acc = np.sqrt(np.mean(accomp[:, mask] ** 2))
        ratio_db = 20 * np.log10(v / acc)
        assert -6.0 <= ratio_db <= 4.0, ratio_db
        assert ratio_db == pytest.approx(song.info["vocal_to_accompaniment_db"], abs=0.05)
        # Every accompaniment stem is audible somewhere, none dominates by more than ~20 dB.
        rms = {k: np.sqrt(np.mean(song.stems[k] ** 2)) for k in ("drums", "bass", "other")}
        loud = max(rms.values())
        assert all(r == 0 or r > loud / 30 for r in rms.values()), rms


def test_vocal_regions_match_vocal_energy(songs):
    hop = 441  # 10 ms frames
    for song in sum(songs.values(), []):
        regions = song.vocal_regions
        assert regions, "every song of 8 s sings at least once"
        assert all(0 <= s < e <= song.seconds for s, e in regions)
        assert all(e0 <= s1 for (_, e0), (s1, _) in zip(regions, regions[1:]))
        rms = _frame_rms(song.stems["vocals"], hop)
        t = (np.arange(rms.shape[0]) + 0.5) * hop / SR
        inside = np.zeros_like(t, dtype=bool)
        sung = np.zeros_like(t, dtype=bool)  # a phrase with its onset consonant and release
        tail = np.zeros_like(t, dtype=bool)  # after a phrase, where its reverb dies away (RT60 <= 2.5 s)
        near = np.zeros_like(t, dtype=bool)  # a breath before a phrase, the phrase and its reverb tail
        for s, e in regions:
            inside |= (t >= s + 0.05) & (t < e - 0.05)
            sung |= (t >= s - 0.1) & (t < e + 0.3)
            tail |= (t >= e + 0.3) & (t < e + 2.6)
            near |= (t >= s - 0.6) & (t < e + 2.6)
        level_in = np.sqrt(np.mean(rms[inside] ** 2))
        # Each sung phrase carries energy throughout most of its frames ...
        for s, e in regions:
            seg = rms[(t >= s + 0.05) & (t < e - 0.05)]
            assert np.mean(seg > level_in * 10 ** (-30 / 20)) > 0.7
        # ... reverb tails are well below the singing, and far from any phrase the stem is silent.
        quiet_tail = tail & ~sung
        if quiet_tail.any():
            assert np.sqrt(np.mean(rms[quiet_tail] ** 2)) < level_in * 10 ** (-20 / 20)
        if (~near).any():
            assert rms[~near].max() < level_in * 10 ** (-60 / 20)


def test_activity_patterns_control_phrase_lengths_and_density():
    def stats(activity):
        lengths, fractions = [], []
        for seed in range(4):
            song = generate_song(seed, 16.0, activity)
            lengths += [e - s for s, e in song.vocal_regions]
            fractions.append(song.vocal_mask(hop=441).mean())
        return np.array(lengths), float(np.mean(fractions))

    sparse_len, sparse_frac = stats("sparse")
    dense_len, dense_frac = stats("dense")
    assert sparse_len.min() >= 0.45 and sparse_len.max() <= 2.05
    assert sparse_frac < 0.35 < 0.6 < dense_frac
    assert np.median(dense_len) > 2 * np.median(sparse_len)


def _yin_f0(x: np.ndarray, sr: int, fmin: float = 70.0, fmax: float = 1100.0, threshold: float = 0.15) -> float:
    """F0 of a short frame by YIN (de Cheveigné & Kawahara 2002): cumulative-mean-normalized difference."""
    w = x.size // 2
    hi = min(int(sr / fmin) + 2, w)
    # d(tau) = sum_j (x_j - x_{j+tau})^2 over a window of w samples, from energies and a cross-correlation.
    energy = np.cumsum(np.concatenate([[0.0], x * x]))
    e0 = energy[w]
    e_tau = energy[np.arange(hi) + w] - energy[np.arange(hi)]
    cross = signal.fftconvolve(x[:w][::-1], x[:w + hi])[w - 1:w - 1 + hi]
    d = e0 + e_tau - 2 * cross
    cmnd = d[1:] * np.arange(1, hi) / (np.cumsum(d[1:]) + 1e-12)
    cmnd = np.concatenate([[1.0], cmnd])
    lo = max(2, int(sr / fmax))
    below = np.flatnonzero(cmnd[lo:hi - 1] < threshold)
    tau = lo + (below[0] if below.size else int(np.argmin(cmnd[lo:hi - 1])))
    while tau + 1 < hi - 1 and cmnd[tau + 1] < cmnd[tau]:
        tau += 1
    a, b, c = cmnd[tau - 1], cmnd[tau], cmnd[tau + 1]
    shift = 0.5 * (a - c) / (a - 2 * b + c + 1e-12)
    return sr / (tau + shift)


def _pitch_track(x: np.ndarray, fmin: float, fmax: float, hop: int = 441, win: int = 2048) -> np.ndarray:
    return np.array([_yin_f0(x[i:i + win], SR, fmin, fmax) for i in range(0, x.size - win, hop)])


def test_sung_pitch_stays_in_the_voice_range_and_on_the_scale():
    song = generate_song(21, 10.0, "dense")
    low, high, _ = VOICE_TYPES[song.info["voice"]]
    lo_hz, hi_hz = 440 * 2 ** ((low - 1 - 69) / 12), 440 * 2 ** ((high + 1 - 69) / 12)
    mid = song.stems["vocals"].mean(axis=0).astype(np.float64)
    f0s = np.concatenate([_pitch_track(mid[int((s + 0.1) * SR):int((e - 0.1) * SR)], lo_hz * 0.8, hi_hz * 1.2)
                          for s, e in song.vocal_regions if e - s > 0.5])
    # The pitch tracker may slip an octave now and then; the singer's range holds for the bulk of frames.
    assert np.mean((f0s > lo_hz * 0.9) & (f0s < hi_hz * 1.1)) > 0.8
    assert lo_hz < np.median(f0s) < hi_hz
    # Most frames sit within 60 cents of a pitch class of the song's scale (vibrato and glides make the rest).
    tonic = ["C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"].index(song.info["key"].split()[0])
    steps = (0, 2, 3, 5, 7, 8, 10) if "minor" in song.info["key"] else (0, 2, 4, 5, 7, 9, 11)
    scale = np.array([tonic + st for st in steps] + [tonic + 12])
    pc = (69 + 12 * np.log2(f0s / 440) - tonic) % 12 + tonic  # pitch class in [tonic, tonic + 12)
    off = np.min(np.abs(pc[:, None] - scale[None, :]), axis=1)
    assert np.mean(off < 0.6) > 0.8
    # A song in another key is off this scale far more often: the check has teeth.
    off_wrong = np.min(np.abs(((pc - tonic + 6) % 12 + tonic)[:, None] - scale[None, :]), axis=1)
    assert np.mean(off_wrong < 0.6) < np.mean(off < 0.6) - 0.2


def _voice_for_one_note(midi: float, vowel: str, seconds: float = 2.5) -> tuple[np.ndarray, dict]:
    """Sing one sustained note on one vowel with the generator's voice model; returns (signal, singer)."""
    rng = np.random.default_rng(0)
    singer = dict(glide_tau=0.03, vib_rate=5.8, vib_depth=0.5, jitter=0.05, drift=0.05, open_q=0.6, tilt_hz=2000.0,
                  breathy=0.02, fscale=1.0, singers_formant=False, presence=1.0, vib_mod=(0.2, 0.0))
    end = seconds - 0.05
    bp = dict(pitch=(np.array([0.0, end]), np.array([midi, midi])),
              vib=(np.array([0.0, 0.3, 0.5, end]), np.array([0.0, 0.0, 1.0, 1.0])),
              amp=(np.array([0.0, 0.05, end - 0.1, end]), np.array([0.0, 1.0, 1.0, 0.0])),
              formants=(np.array([0.0, end]), np.array([VOWELS[vowel]] * 2, dtype=np.float64)))
    x, _ = _sing_segment(rng, 0.0, int(seconds * SR), SR, bp, singer)
    return x, singer


def test_voice_model_vibrato_rate_depth_and_pitch():
    x, singer = _voice_for_one_note(57.0, "a")  # A3, 220 Hz
    f0 = _pitch_track(x[int(0.6 * SR):int(2.3 * SR)], 150, 320)
    cents = 1200 * np.log2(f0 / 220.0)
    assert abs(np.median(cents)) < 20  # on pitch
    freqs, power = signal.welch(cents - cents.mean(), fs=SR / 441, nperseg=128)
    peak = freqs[np.argmax(power)]
    assert abs(peak - singer["vib_rate"]) < 0.8
    depth = np.sqrt(2) * cents.std()  # peak deviation of a sinusoid
    assert 0.6 * 100 * singer["vib_depth"] < depth < 1.5 * 100 * singer["vib_depth"]


def _lpc_formants(x: np.ndarray, order: int = 12) -> np.ndarray:
    """Formant frequencies (Hz) of a voiced stretch by autocorrelation LPC at 11.025 kHz."""
    from scipy.linalg import solve_toeplitz

    y = signal.lfilter([1, -0.9], [1], signal.resample_poly(x, 1, 4))
    sr = SR / 4
    found = []
    for i in range(0, y.size - 512, 256):
        frame = y[i:i + 441] * np.hamming(441)
        r = np.correlate(frame, frame, "full")[440:440 + order + 1]
        a = np.concatenate([[1.0], solve_toeplitz(r[:order], -r[1:])])
        roots = np.roots(a)
        roots = roots[np.imag(roots) > 0]
        f = np.angle(roots) * sr / (2 * np.pi)
        bw = -np.log(np.abs(roots)) * sr / np.pi
        found.append(np.sort(f[(bw < 400) & (f > 150)])[:2])
    return np.median(np.array([f for f in found if f.size == 2]), axis=0)


@pytest.mark.parametrize("vowel", ["a", "i", "u"])
def test_voice_model_formants_follow_the_vowel(vowel):
    x, _ = _voice_for_one_note(50.0, vowel)  # D3, low enough to resolve F1
    f1, f2 = _lpc_formants(x[int(0.3 * SR):int(2.2 * SR)])
    assert f1 == pytest.approx(VOWELS[vowel][0], rel=0.2)
    assert f2 == pytest.approx(VOWELS[vowel][1], rel=0.2)


def test_vocal_free_and_varied_songs():
    quiet = generate_song(21, 4.0, "none")
    assert not np.any(quiet.stems["vocals"]) and quiet.vocal_regions == []
    np.testing.assert_allclose(sum(quiet.stems[k] for k in STEMS), quiet.mixture, atol=1e-6)
    assert 0.3 <= np.abs(quiet.mixture).max() < 1.0
    drawn, leads, ratios = set(), [], []
    for seed in range(10):
        song = generate_song(seed, 4.0, "varied")
        again = generate_song(seed, 4.0, "varied")
        np.testing.assert_array_equal(song.mixture, again.mixture)
        np.testing.assert_allclose(sum(song.stems[k] for k in STEMS), song.mixture, atol=1e-6)
        assert np.abs(song.mixture).max() < 1.0 and max(np.abs(song.stems[k]).max() for k in STEMS) < 1.0
        activity = song.info["drawn_activity"]
        drawn.add(activity)
        assert activity in MODES[:4]
        if activity == "none":
            assert not np.any(song.stems["vocals"]) and song.vocal_regions == []
        else:  # the singing is that of the classic mode drawn; only levels, reverb and the extra lead differ
            assert song.vocal_regions == generate_song(seed, 4.0, activity).vocal_regions
        leads += [o for o in song.info["other"] if o.startswith("hard lead")]
        ratios.append(song.info["vocal_to_accompaniment_db"])
    assert len(drawn) >= 3
    assert 4 <= len(leads) and all(o[len("hard lead ("):-1] in HARD_LEAD_KINDS for o in leads)
    assert min(ratios) < -5 or max(ratios) > 3  # a wider vocal level than the classic -5..+3 dB
    with pytest.raises(ValueError, match="vocal_activity"):
        SynthDataset(SR, vocal_activity="loud")


@pytest.mark.parametrize(("setting", "key", "stem", "choices"),
                         [("bass_kind", "bass", "bass", BASS_KINDS), ("voice", "voice", "vocals", VOICE_TYPES)])
def test_a_forced_choice_changes_only_its_stem(setting, key, stem, choices):
    """`bass_kind` swaps the bass timbre (the same notes), `voice` the singer (the same phrases); every other stem is
    the same signal, scaled by the levels set against the changed one."""
    drawn = generate_song(3, 4.0, "sparse")  # a finger bass, playing; a soprano
    choice = next(c for c in choices if c != drawn.info[key])
    forced = generate_song(3, 4.0, "sparse", **{setting: choice})
    assert forced.info[key] == choice and forced.vocal_regions == drawn.vocal_regions
    assert forced.info["key"] == drawn.info["key"] and forced.info["other"] == drawn.info["other"]
    for name in STEMS:
        a, b = drawn.stems[name].astype(np.float64), forced.stems[name].astype(np.float64)
        if name == stem:
            assert not np.allclose(a, b, atol=1e-3)
        else:
            np.testing.assert_allclose(b, a * (np.dot(a.ravel(), b.ravel()) / np.dot(a.ravel(), a.ravel())), atol=1e-6)
    same = generate_song(3, 4.0, "sparse", **{setting: drawn.info[key]})
    np.testing.assert_array_equal(same.mixture, drawn.mixture)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="vocal_activity"):
        generate_song(0, 2.0, "loud")
    with pytest.raises(ValueError, match="seconds"):
        generate_song(0, 0.5)
    with pytest.raises(ValueError, match="bass_kind must be one of finger, synth, sub"):
        generate_song(0, 2.0, bass_kind="tuba")
    with pytest.raises(ValueError, match="voice must be one of"):
        generate_song(0, 2.0, voice="countertenor")


def test_cli_writes_a_valid_musdb_layout(tmp_path):
    root = tmp_path / "synth"
    argv = ["synth", "--out", str(root), "--tracks", "2", "--valid-tracks", "1", "--test-tracks", "1", "--seconds",
            "3", "--seed", "4", "--test-activity", "sparse", "--valid-activity", "none"]
    assert main(argv + ["--workers", "2"]) == 0
    train = sorted(p.name for p in (root / "train").iterdir())
    valid = sorted(p.name for p in (root / "valid").iterdir())
    test = sorted(p.name for p in (root / "test").iterdir())
    assert len(train) == 2 and len(valid) == 1 and len(test) == 1
    # The training code's MUSDB18-HQ reader takes the folder as it is.
    musdb = load_musdb(root)
    assert [t.name for t in musdb.train] == train and [t.name for t in musdb.valid] == valid
    assert [t.name for t in musdb.test] == test and musdb.train[0].frames == 3 * SR
    for split, names in (("train", train), ("valid", valid), ("test", test)):
        for name in names:
            folder = root / split / name
            data = {}
            for stem in ("mixture",) + STEMS:
                info = sf.info(str(folder / f"{stem}.wav"))
                assert info.samplerate == SR and info.channels == 2 and info.frames == 3 * SR
                assert info.subtype == "PCM_16"
                data[stem], _ = sf.read(str(folder / f"{stem}.wav"), dtype="int16")
            # Integer stems add up to the mixture exactly.
            total = sum(data[s].astype(np.int32) for s in STEMS)
            np.testing.assert_array_equal(total, data["mixture"])
            meta = json.loads((folder / REGIONS_FILENAME).read_text())
            assert meta["vocal_activity"] == {"test": "sparse", "valid": "none"}.get(split, "mixed")
            song = generate_song(meta["seed"], 3.0, meta["vocal_activity"])
            assert [tuple(r) for r in meta["vocal_regions"]] == song.vocal_regions
            np.testing.assert_allclose(data["vocals"].T / 32768.0, song.stems["vocals"], atol=1 / 32768)
    assert json.loads((root / "synth.json").read_text())["tracks"] == 2
    # Running again keeps the tracks; other settings on the same folder are refused with a clear error.
    mtime = (root / "train" / train[0] / "mixture.wav").stat().st_mtime_ns
    assert main(argv) == 0
    assert (root / "train" / train[0] / "mixture.wav").stat().st_mtime_ns == mtime
    assert main(["synth", "--out", str(root), "--tracks", "1", "--seconds", "4", "--seed", "4"]) == 1
    assert main(["synth", "--out", str(root), "--tracks", "1", "--seconds", "4", "--seed", "4", "--overwrite"]) == 0
    assert sf.info(str(root / "train" / train[0] / "vocals.wav")).frames == 4 * SR
    assert not list(root.rglob("*.tmp"))
    assert main(["synth", "--out", str(root), "--tracks", "0"]) == 1


def test_cli_forced_voice_and_bass_give_the_same_songs_otherwise(tmp_path):
    """`--voice` / `--bass-kind`: a test set that differs from the drawn one only in the singer and the bass."""
    common = ["--tracks", "0", "--test-tracks", "2", "--seconds", "3", "--seed", "4", "--vocal-activity", "sparse"]
    assert main(["synth", "--out", str(tmp_path / "drawn"), *common]) == 0
    assert main(["synth", "--out", str(tmp_path / "forced"), *common, "--voice", "tenor", "--bass-kind", "synth"]) == 0
    for index in range(2):
        name = f"test/synth-4-{index:04d}"
        drawn = json.loads((tmp_path / "drawn" / name / REGIONS_FILENAME).read_text())
        forced = json.loads((tmp_path / "forced" / name / REGIONS_FILENAME).read_text())
        assert forced["voice"] == "tenor" and forced["bass"] == "synth"
        assert forced["vocal_regions"] == drawn["vocal_regions"] and forced["key"] == drawn["key"]
        song = generate_song(forced["seed"], 3.0, "sparse", voice="tenor", bass_kind="synth")
        vocals, _ = sf.read(str(tmp_path / "forced" / name / "vocals.wav"), dtype="float32")
        np.testing.assert_allclose(vocals.T, song.stems["vocals"], atol=1 / 32768)
    # the same folder asked for another voice, or for drawn ones, is not mixed in: refused without --overwrite
    assert main(["synth", "--out", str(tmp_path / "forced"), *common, "--voice", "alto"]) == 1
    assert main(["synth", "--out", str(tmp_path / "forced"), *common]) == 1
    assert main(["synth", "--out", str(tmp_path / "drawn"), *common]) == 0  # kept as it is


def test_synth_dataset_streams_deterministic_excerpts():
    import torch

    seg = 2 * SR
    ds = SynthDataset(seg, targets=("vocals", "drums"), seed=3, song_seconds=4.0)
    mix, tgt = ds[5]  # song 2, second excerpt
    assert mix.shape == (2, seg) and tgt.shape == (2, 2, seg) and mix.dtype == torch.float32
    song = generate_song((3, 3, 2), 4.0, ds.activities[int(np.random.default_rng([3, 2, 7]).integers(3))])
    np.testing.assert_array_equal(mix.numpy(), song.mixture[:, seg:2 * seg])
    np.testing.assert_array_equal(tgt[0].numpy(), song.stems["vocals"][:, seg:2 * seg])
    again = SynthDataset(seg, targets=("vocals", "drums"), seed=3, song_seconds=4.0)[5]
    assert torch.equal(again[0], mix) and torch.equal(again[1], tgt)
    mono = SynthDataset(SR, channels=1, vocal_activity="sparse")
    loader = torch.utils.data.DataLoader(mono, batch_size=2, sampler=range(2))
    m, t = next(iter(loader))
    assert m.shape == (2, 1, SR) and t.shape == (2, 1, 1, SR)
    with pytest.raises(ValueError, match="targets"):
        SynthDataset(seg, targets=("piano",))
