"""Procedural multitrack songs with controllable vocal density, for training and testing without MUSDB18-HQ.

`generate_song(seed, seconds, vocal_activity)` returns a `Song`: four stems (vocals, drums, bass, other), each
`(channels, time)` float32 at 44.1 kHz stereo, their exact sum as the mixture, and the sung phrases as
`[(start_s, end_s), ...]`. Everything is drawn from one seed, so the same seed gives the same song bit for bit.

What is in a song:
- A plan: random key (12 roots, major or minor), tempo 70-160 BPM, a chord progression (common pop/rock progressions
  or a random diatonic walk), 4-bar sections in which each accompaniment instrument plays or rests.
- Vocals, built like a source-filter voice: a Rosenberg glottal-pulse source (open quotient per singer) with a
  one-pole spectral tilt, plus pulse-synchronous aspiration noise; pitch follows a melody on the song's scale that
  favours chord tones, with portamento (one-pole glide), scoops, vibrato at 5-7 Hz that sets in after each note's
  onset, fast jitter and slow drift; vowel formants F1-F5 (Peterson & Barney / Hillenbrand-like tables scaled per
  voice type; sopranos tune F1 to a high F0) move between vowels per syllable and are applied per STFT frame,
  with an optional singer's formant near 3 kHz and a presence shelf;
  consonants are filtered noise bursts (s, sh, f, h, t, k, p) that cut voicing; breaths precede some phrases;
  phrase envelopes shape attack, dynamics and release. Voice types: bass, baritone, tenor, alto, mezzo, soprano.
  In about 30% of songs a second singer of the same type adds a diatonic third above or below on some phrases
  (sometimes on "ooh"/"aah"), panned to one side, 4-10 dB down - MUSDB18's vocal stems include backing vocals.
- Vocal activity: "sparse" (0.5-2 s phrases with 2-7 s gaps), "dense" (2.5-8 s phrases, short gaps), "mixed"
  (the three densities, persisting for a while, mixed within a song).
- "none": a song without vocals. "varied" (for training): per song, the activity is drawn (sparse 35%, mixed 20%,
  dense 30%, none 15%), the vocal level -12..+6 dB against the accompaniment, the vocal reverb send -24..-3 dB in
  a 0.3-3 s hall, and in 80% of songs an extra hard-negative lead joins "other": saw, square, flute, string, sax,
  whistle or overdriven guitar with fundamentals ~220 Hz-1.3 kHz (the singing range), vibrato and glides, mostly
  answering the singer in the gaps. These draws use their own random stream: the classic modes are unchanged.
- Drums: synthesized kick, snare, closed/open hi-hat, crash, ride and toms, placed from style templates (rock,
  four-on-the-floor, half-time, funk, ballad) with random variations, ghost notes, fills, swing and humanized timing.
- Bass on the chord roots (with fifths, octaves and approach notes) in several rhythms and timbres.
- Other: pads, plucked arpeggios, electric-piano/organ keys and a lead with vibrato and portamento that is *not* a
  voice (fixed timbre, no formants, sometimes answering the singer in the gaps); all band-limited wavetables.
- Panning (constant power); convolution reverb with synthesized stereo impulse responses (noise tails whose highs
  decay faster, early reflections): a hall (RT60 0.5-2.2 s) for vocals and other, a short room for drums, bass dry;
  stem balance within a few dB; a vocal-to-accompaniment ratio of -5..+3 dB over the sung phrases; the mixture's
  peak lands in 0.4-0.9 and no stem clips.

`SynthDataset` streams excerpts of fresh songs in the item format of the training datasets (no files needed);
`bsmamba2 synth` writes songs in the MUSDB18-HQ layout.

The sung phrases in `vocal_regions` are the labels; breaths (about -30 dB) and reverb tails lie outside them.
Only numpy and scipy.signal are used; there are no per-sample Python loops (loops run over notes and events).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import fft as sp_fft
from scipy import signal

log = logging.getLogger(__name__)

STEMS: tuple[str, ...] = ("vocals", "drums", "bass", "other")
ACTIVITIES: tuple[str, ...] = ("sparse", "mixed", "dense")
# What `generate_song` accepts: the activity patterns, "none" (a song without vocals) and "varied" (a training mix:
# per song, the activity (or none), the vocal level, the reverb and a hard-negative lead are drawn; see VARIED).
MODES: tuple[str, ...] = ACTIVITIES + ("none", "varied")
VARIED = {
    "activity": {"sparse": 0.35, "mixed": 0.2, "dense": 0.3, "none": 0.15},
    "vocal_to_accompaniment_db": (-12.0, 6.0),  # the classic modes draw -5..+3
    "vocal_reverb_db": (-24.0, -3.0),  # wet send of the vocal hall; the classic modes draw -16..-6
    "hall_rt60_s": (0.3, 3.0),  # classic: 0.5..2.2
    "hard_lead_prob": 0.8,  # an extra lead in the singing range (HARD_LEAD_KINDS), on top of the usual "other"
    "hard_lead_db": (-6.0, 4.0),  # its level against the rest of "other"
    "hard_lead_answer_prob": 0.7,  # how often it plays in the vocal gaps (else anywhere)
}
BASS_KINDS: tuple[str, ...] = ("finger", "synth", "sub")  # "synth": a saw-like tone, harmonics up to 0.4-1.2 kHz
REGIONS_FILENAME = "vocal_regions.json"
SAMPLE_RATE = 44100

# ----------------------------------------------------------------------------------------------------------- music

MAJOR = (0, 2, 4, 5, 7, 9, 11)
MINOR = (0, 2, 3, 5, 7, 8, 10)  # natural minor; the V chord is sometimes made major below
NOTE_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
# Progressions as scale degrees (0 = tonic), common in pop and rock.
PROGRESSIONS_MAJOR = ((0, 4, 5, 3), (5, 3, 0, 4), (0, 5, 3, 4), (1, 4, 0, 0), (0, 3, 0, 4), (0, 3, 4, 3),
                      (0, 2, 3, 4), (3, 4, 2, 5), (0, 4, 3, 3), (0, 0, 3, 4))
PROGRESSIONS_MINOR = ((0, 5, 2, 6), (0, 3, 4, 0), (0, 6, 5, 6), (0, 5, 3, 4), (0, 3, 6, 2), (0, 0, 5, 6),
                      (0, 2, 6, 5))


def _midi_to_hz(midi: np.ndarray | float) -> np.ndarray | float:
    return 440.0 * 2.0 ** ((np.asarray(midi) - 69.0) / 12.0)


@dataclass
class _Chord:
    start: float  # seconds
    end: float
    root_pc: int  # pitch class 0..11
    tones: tuple[int, ...]  # pitch classes, root first


@dataclass
class _Plan:
    """The song's skeleton, shared by every instrument."""

    seconds: float
    tempo: float  # beats per minute
    key: int  # pitch class of the tonic
    minor: bool
    scale: tuple[int, ...]  # pitch classes of the scale, tonic first
    chords: list[_Chord]
    beat: float  # seconds per beat
    bar: float  # seconds per bar (4/4)
    swing: float  # 0 = straight; delay of the off-beat 16th as a fraction of a 16th
    sections: list[tuple[float, float]]  # 4-bar sections (start, end) in seconds

    def chord_at(self, t: float) -> _Chord:
        for chord in self.chords:
            if chord.start <= t < chord.end:
                return chord
        return self.chords[-1]

    def scale_midi(self, low: float, high: float) -> np.ndarray:
        """MIDI numbers of the scale within [low, high]."""
        notes = [m for m in range(int(low), int(high) + 1) if m % 12 in self.scale]
        return np.array(notes, dtype=np.int64)


def _make_plan(rng: np.random.Generator, seconds: float) -> _Plan:
    tempo = float(rng.uniform(70, 160))
    beat = 60.0 / tempo
    bar = 4 * beat
    key = int(rng.integers(12))
    minor = bool(rng.random() < 0.4)
    scale_steps = MINOR if minor else MAJOR
    scale = tuple((key + s) % 12 for s in scale_steps)
    if rng.random() < 0.75:
        table = PROGRESSIONS_MINOR if minor else PROGRESSIONS_MAJOR
        degrees = list(table[int(rng.integers(len(table)))])
    else:  # random diatonic walk that starts on the tonic
        degrees = [0] + [int(d) for d in rng.integers(0, 7, size=3)]
    bars_per_chord = float(rng.choice([0.5, 1.0, 1.0, 1.0, 2.0]))
    chord_len = bars_per_chord * bar
    chords: list[_Chord] = []
    t, i = 0.0, 0
    sevenths = rng.random() < 0.3
    while t < seconds + bar:
        degree = degrees[i % len(degrees)]
        tones_deg = [degree, degree + 2, degree + 4] + ([degree + 6] if sevenths else [])
        tones = [(key + scale_steps[d % 7]) % 12 for d in tones_deg]
        if minor and degree == 4 and rng.random() < 0.5:  # harmonic-minor dominant
            tones[1] = (tones[1] + 1) % 12
        chords.append(_Chord(t, t + chord_len, tones[0], tuple(tones)))
        t += chord_len
        i += 1
    section_len = 4 * bar
    n_sections = max(1, math.ceil(seconds / section_len))
    sections = [(k * section_len, min(seconds, (k + 1) * section_len)) for k in range(n_sections)]
    swing = float(rng.choice([0.0, 0.0, 0.0, rng.uniform(0.15, 0.35)]))
    return _Plan(seconds, tempo, key, minor, scale, chords, beat, bar, swing, sections)


# ------------------------------------------------------------------------------------------------------- helpers


def _db(x: float) -> float:
    return 10.0 ** (x / 20.0)


def _pan(mono: np.ndarray, pan: float) -> np.ndarray:
    """Constant-power pan: pan in [-1 (left), 1 (right)]. Returns (2, time)."""
    angle = (pan + 1.0) * math.pi / 4.0
    return np.stack([mono * math.cos(angle), mono * math.sin(angle)])


def _add(buf: np.ndarray, start: int, x: np.ndarray) -> None:
    """Add `x` into `buf` (..., time) at sample `start`, clipped to the buffer."""
    n = buf.shape[-1]
    if start >= n or start + x.shape[-1] <= 0:
        return
    lo = max(0, -start)
    hi = min(x.shape[-1], n - start)
    buf[..., start + lo:start + hi] += x[..., lo:hi]


def _env(n: int, sr: int, points: Sequence[tuple[float, float]]) -> np.ndarray:
    """Piecewise-linear envelope of n samples through (time_s, value) breakpoints."""
    t = np.arange(n) / sr
    bt, bv = zip(*points)
    return np.interp(t, bt, bv)


def _wavetable(amps: np.ndarray, length: int = 2048) -> np.ndarray:
    """One period of sum_k amps[k-1] sin(2 pi k x), with a wrap-around sample appended: (length + 1,)."""
    spec = np.zeros(length // 2 + 1, dtype=np.complex128)
    k = min(len(amps), length // 2 - 1)
    spec[1:k + 1] = -1j * amps[:k] * (length / 2)
    table = np.fft.irfft(spec, n=length)
    return np.concatenate([table, table[:1]])


def _osc(table: np.ndarray, freq: np.ndarray | float, n: int, sr: int, phase0: float = 0.0) -> np.ndarray:
    """Read a wavetable at frequency `freq` (Hz, scalar or (n,)) with linear interpolation: (n,)."""
    length = table.shape[0] - 1
    if np.ndim(freq) == 0:
        phase = phase0 + np.arange(n) * (float(freq) / sr)
    else:
        phase = phase0 + np.cumsum(np.asarray(freq, dtype=np.float64) / sr)
    pos = (phase - np.floor(phase)) * length
    i0 = pos.astype(np.int64)
    frac = pos - i0
    return table[i0] * (1.0 - frac) + table[i0 + 1] * frac


def _harmonics(f0: float, sr: int, slope: float, cutoff: float, max_k: int = 64, odd_only: bool = False,
               extra: dict[int, float] | None = None) -> np.ndarray:
    """Band-limited harmonic amplitudes: k^-slope, a 4th-order low-pass roll-off at `cutoff`, nothing above 0.45 sr."""
    k = np.arange(1, max_k + 1, dtype=np.float64)
    amps = k ** -slope / np.sqrt(1.0 + (k * f0 / cutoff) ** 4)
    if odd_only:
        amps[1::2] = 0.0
    if extra:
        for h, a in extra.items():
            if h <= max_k:
                amps[h - 1] += a
    amps[k * f0 > 0.45 * sr] = 0.0
    return amps


def _bandpass(low: float, high: float, sr: int, order: int = 2) -> np.ndarray:
    high = min(high, 0.45 * sr)
    return signal.butter(order, [low, high], btype="bandpass", fs=sr, output="sos")


def _rms(x: np.ndarray, mask: np.ndarray | None = None) -> float:
    """RMS of x (..., time), over the samples where mask (time,) is True if given."""
    flat = x.reshape(-1, x.shape[-1])  # (channels, time)
    energy = np.einsum("ct,ct->t", flat, flat)  # (time,)
    if mask is None:
        return float(math.sqrt(energy.mean() / max(1, x.size // x.shape[-1])))
    count = int(np.count_nonzero(mask)) * max(1, x.size // x.shape[-1])
    return float(math.sqrt(np.dot(energy, mask) / count)) if count else 0.0


def _stft_filter(x: np.ndarray, gains: np.ndarray, active: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """Filter x with a different magnitude response per STFT frame (weighted overlap-add, Hann, hop n_fft/4).

    Args:
        x: (time,) signal.
        gains: (active frames, n_fft // 2 + 1) magnitude responses, one per frame marked in `active`.
        active: (frames,) bool; frames not marked are silent in the output.
    Returns:
        (time,) filtered signal.
    """
    n = x.shape[0]
    pad = n_fft // 2
    n_frames = active.shape[0]
    xp = np.pad(x, (pad, pad + n_fft))
    frames = np.lib.stride_tricks.sliding_window_view(xp, n_fft)[::hop][:n_frames]  # (frames, n_fft)
    window = np.hanning(n_fft + 1)[:-1]  # periodic Hann
    idx = np.flatnonzero(active)
    spec = np.fft.rfft(frames[idx] * window, axis=-1) * gains  # (active frames, bins)
    out_frames = np.zeros((n_frames, n_fft))
    out_frames[idx] = np.fft.irfft(spec, n=n_fft, axis=-1) * window
    # Overlap-add in n_fft/hop strided adds; Hann^2 at hop n_fft/4 sums to 1.5 everywhere.
    ratio = n_fft // hop
    y = np.zeros((n_frames + ratio) * hop)
    for j in range(ratio):
        y[j * hop:j * hop + n_frames * hop] += out_frames[:, j * hop:(j + 1) * hop].reshape(-1)
    return y[pad:pad + n] / 1.5


# -------------------------------------------------------------------------------------------------------- vocals

# Vowel formants (Hz) F1..F4 for an adult male voice, after Peterson & Barney / Hillenbrand averages.
VOWELS: dict[str, tuple[float, float, float, float]] = {
    "a": (730, 1090, 2440, 3400),
    "ae": (660, 1720, 2410, 3400),
    "e": (530, 1840, 2480, 3500),
    "i": (270, 2290, 3010, 3700),
    "I": (390, 1990, 2550, 3600),
    "o": (570, 840, 2410, 3300),
    "u": (300, 870, 2240, 3300),
    "uh": (640, 1190, 2390, 3400),
}
VOWEL_WEIGHTS = {"a": 3, "ae": 1, "e": 2, "i": 2, "I": 1, "o": 2, "u": 1.5, "uh": 1}
BANDWIDTHS = (80.0, 100.0, 140.0, 220.0, 300.0)
# name: (lowest F0, highest F0, formant scale)
VOICE_TYPES: dict[str, tuple[int, int, float]] = {
    "bass": (40, 64, 0.92),  # E2..E4 as MIDI
    "baritone": (43, 67, 0.96),
    "tenor": (48, 72, 1.0),
    "alto": (53, 77, 1.12),
    "mezzo": (57, 81, 1.15),
    "soprano": (60, 84, 1.18),
}
# Consonants: (band low Hz, band high Hz, duration s, relative level dB, voiced?)
CONSONANTS: dict[str, tuple[float, float, float, float, bool]] = {
    "s": (4500, 11000, 0.09, -8, False),
    "sh": (2000, 6500, 0.10, -8, False),
    "f": (1200, 9000, 0.08, -16, False),
    "h": (500, 4000, 0.07, -16, False),
    "t": (3000, 8000, 0.03, -6, False),
    "k": (1300, 3500, 0.035, -8, False),
    "p": (300, 3000, 0.025, -10, False),
    "m": (0, 0, 0.07, 0, True),
    "n": (0, 0, 0.06, 0, True),
    "l": (0, 0, 0.05, 0, True),
}
ACTIVITY_REGIMES = {
    # phrase length (s), gap (s)
    "sparse": ((0.5, 2.0), (2.0, 7.0)),
    "medium": ((1.0, 4.0), (0.6, 3.0)),
    "dense": ((2.5, 8.0), (0.25, 1.2)),
}


@dataclass
class _Syllable:
    start: float
    end: float
    midi: float
    vowel: str
    vowel2: str | None  # diphthong target, or None
    consonant: str | None


@dataclass
class _Phrase:
    start: float
    end: float
    syllables: list[_Syllable] = field(default_factory=list)


def _plan_phrases(rng: np.random.Generator, plan: _Plan, activity: str) -> list[tuple[float, float]]:
    """Sung phrase spans (start_s, end_s), on a 16th-note grid."""
    grid = plan.beat / 4
    regimes = {"sparse": ["sparse"], "dense": ["dense"], "mixed": ["sparse", "medium", "dense"]}[activity]
    regime = str(rng.choice(regimes))
    longest_gap = ACTIVITY_REGIMES[regime][1][1]
    t = float(rng.uniform(0.1, max(0.2, min(longest_gap, 0.25 * plan.seconds))))  # the intro before the first phrase
    spans: list[tuple[float, float]] = []
    while True:
        (p_lo, p_hi), (g_lo, g_hi) = ACTIVITY_REGIMES[regime]
        length = math.exp(rng.uniform(math.log(p_lo), math.log(p_hi)))
        start = round(t / grid) * grid
        end = start + max(p_lo, round(length / grid) * grid)
        end = min(end, start + p_hi)
        if end > plan.seconds - 0.15:
            # The song ends mid-phrase: keep what fits if it is a phrase at all; every song sings at least once.
            if not spans:
                start = max(0.05, min(start, plan.seconds - 0.15 - p_lo))
            end = plan.seconds - 0.15
            if end - start >= min(p_lo, 0.5):
                spans.append((start, end))
            elif not spans and end - start >= 0.3:
                spans.append((start, end))
            break
        spans.append((start, end))
        gap = math.exp(rng.uniform(math.log(g_lo), math.log(g_hi)))
        t = end + gap
        if activity == "mixed" and rng.random() < 0.35:
            regime = str(rng.choice(regimes))
    return spans


def _plan_melody(rng: np.random.Generator, plan: _Plan, spans: list[tuple[float, float]], low: int,
                 high: int) -> list[_Phrase]:
    centre = rng.uniform(low + 5, high - 7)
    notes = plan.scale_midi(max(low, centre - 8), min(high, centre + 9))
    vowels = list(VOWEL_WEIGHTS)
    vweights = np.array([VOWEL_WEIGHTS[v] for v in vowels], dtype=np.float64)
    vweights /= vweights.sum()
    cons = list(CONSONANTS)
    steps = np.array([-4, -3, -2, -1, 0, 1, 2, 3, 4])
    step_p = np.array([0.03, 0.06, 0.15, 0.24, 0.08, 0.24, 0.12, 0.05, 0.03])
    durations = np.array([0.5, 1.0, 1.5, 2.0, 0.25])  # beats
    dur_p = np.array([0.4, 0.3, 0.1, 0.12, 0.08])
    idx = int(np.argmin(np.abs(notes - centre)))
    phrases = []
    for start, end in spans:
        phrase = _Phrase(start, end)
        t = start
        while t < end - 0.05:
            dur = float(rng.choice(durations, p=dur_p)) * plan.beat
            s_end = min(end, t + dur)
            if end - s_end < 0.12:  # phrase-final lengthening: absorb a too-short remainder
                s_end = end
            step = int(rng.choice(steps, p=step_p))
            idx = idx + step
            if idx < 0 or idx >= len(notes):
                idx = int(np.clip(idx - 2 * step, 0, len(notes) - 1))
            midi = float(notes[idx])
            chord = plan.chord_at(t)
            if rng.random() < 0.5 and (int(midi) % 12) not in chord.tones:  # lean onto a chord tone
                for d in (1, -1, 2, -2):
                    j = idx + d
                    if 0 <= j < len(notes) and int(notes[j]) % 12 in chord.tones:
                        idx, midi = j, float(notes[j])
                        break
            vowel = str(rng.choice(vowels, p=vweights))
            vowel2 = str(rng.choice(vowels, p=vweights)) if rng.random() < 0.2 else None
            consonant = str(rng.choice(cons)) if (rng.random() < 0.6 or t == start) else None
            phrase.syllables.append(_Syllable(t, s_end, midi, vowel, vowel2, consonant))
            t = s_end
        phrases.append(phrase)
    return phrases


def _formant_gains(formants: np.ndarray, bandwidths: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """Cascade of 2-pole resonators, unity gain at DC.

    Args:
        formants: (frames, k) centre frequencies in Hz.
        bandwidths: (frames, k) bandwidths in Hz.
        freqs: (bins,) frequencies in Hz.
    Returns:
        (frames, bins) magnitude response.
    """
    f = freqs[None, :]
    power = np.ones((formants.shape[0], freqs.shape[0]))
    for i in range(formants.shape[1]):
        fc = formants[:, i:i + 1]
        b2 = (bandwidths[:, i:i + 1] / 2) ** 2
        power *= (fc * fc + b2) ** 2 / (((f - fc) ** 2 + b2) * ((f + fc) ** 2 + b2))
    return np.sqrt(power)


def _sing_segment(rng: np.random.Generator, t0: float, m: int, sr: int, bp: dict, singer: dict) -> tuple[
        np.ndarray, np.ndarray]:
    """Voiced singing for m samples from time t0: (m,) signal and (m,) its voicing amplitude envelope."""
    t = t0 + np.arange(m) / sr
    # Pitch: note steps (with scoops) -> one-pole glide -> vibrato, fast jitter and slow drift.
    target = np.interp(t, *bp["pitch"])
    a = math.exp(-1.0 / (singer["glide_tau"] * sr))
    pitch = signal.lfilter([1 - a], [1, -a], target, zi=[target[0] * a])[0]
    mod_hz, mod_phase = singer["vib_mod"]
    rate = singer["vib_rate"] * (1 + 0.04 * np.sin(2 * np.pi * mod_hz * t + mod_phase))
    vib_phase = 2 * np.pi * (singer["vib_rate"] * t0 + np.cumsum(rate) / sr)
    pitch += singer["vib_depth"] * np.interp(t, *bp["vib"]) * np.sin(vib_phase)
    noise_j = signal.sosfilt(signal.butter(2, 150.0, fs=sr, output="sos"), rng.standard_normal(m))
    noise_d = signal.sosfilt(signal.butter(2, 3.0, fs=sr, output="sos"), rng.standard_normal(m))
    noise_j /= noise_j.std() + 1e-12
    pitch += singer["jitter"] * noise_j + singer["drift"] * noise_d / (noise_d.std() + 1e-12)
    f0 = _midi_to_hz(pitch)

    # Glottal source: Rosenberg flow derivative, one-pole spectral tilt, pulse-synchronous aspiration.
    phase = np.cumsum(f0 / sr)
    p = phase - np.floor(phase)
    open_q = singer["open_q"]
    tp, tn = 0.65 * open_q, 0.35 * open_q
    src = np.where(p < tp, np.pi / (2 * tp) * np.sin(np.pi * np.minimum(p, tp) / tp), 0.0)
    closing = (p >= tp) & (p < tp + tn)
    src = np.where(closing, -np.pi / (2 * tn) * np.sin(np.pi / 2 * (p - tp) / tn), src)
    a = math.exp(-2 * np.pi * singer["tilt_hz"] / sr)
    src = signal.lfilter([1 - a], [1, -a], src)
    src /= src.std() + 1e-12
    src += singer["breathy"] * 4.0 * rng.standard_normal(m) * (0.35 + 0.65 * (p < open_q))
    amp = np.interp(t, *bp["amp"])
    voiced = src * amp * (1.0 + 0.08 * noise_j)  # shimmer

    # Formants per STFT frame (F1-F5), F1 kept above a high F0 as singers do.
    n_fft, hop = 1024, 256
    n_frames = m // hop + 1
    frame_t = t0 + np.arange(n_frames) * hop / sr
    active = np.interp(frame_t, *bp["amp"]) > 0
    active = np.convolve(active, np.ones(5), mode="same") > 0  # frames whose windows touch voicing
    at = frame_t[active]
    ft, fv = bp["formants"]
    fscale = singer["fscale"]
    formants = np.stack([np.interp(at, ft, fv[:, i]) for i in range(4)]
                        + [np.full(at.shape, 4500.0 * fscale)], axis=1)  # (frames, 5)
    frame_f0 = _midi_to_hz(np.interp(at, *bp["pitch"]))
    # Sopranos and altos tune F1 to a high F0 (jaw opening); nobody lets F1 fall below F0.
    tune = np.clip((frame_f0 - 400.0) / 200.0, 0.0, 1.0)
    formants[:, 0] += tune * (1.05 * frame_f0 - formants[:, 0])
    formants[:, 0] = np.maximum(formants[:, 0], 1.05 * frame_f0)
    formants[:, 1] = np.maximum(formants[:, 1], formants[:, 0] + 250.0)
    bws = np.broadcast_to(np.array(BANDWIDTHS), formants.shape).copy()
    bws[:, 0] = np.maximum(bws[:, 0], 0.08 * frame_f0)
    freqs = np.fft.rfftfreq(n_fft, 1 / sr)
    gains = _formant_gains(formants, bws, freqs)
    if singer["singers_formant"]:  # the 3 kHz cluster of trained voices
        gains *= 1.0 + 2.0 * np.exp(-0.5 * ((freqs - 3000.0 * fscale) / 400.0) ** 2)
    # Presence: a high shelf above ~2.5 kHz (0 dB for a dark voice, up to +12 dB for a bright one).
    gains *= 1.0 + (singer["presence"] - 1.0) / (1.0 + (2500.0 / np.maximum(freqs, 1.0)) ** 4)
    return _stft_filter(voiced, gains, active, n_fft, hop), amp


def _draw_singer(rng: np.random.Generator, voice: str) -> dict:
    """A singer's constants: formant scale, glide, vibrato, jitter, source shape, brightness."""
    _, _, fscale = VOICE_TYPES[voice]
    return dict(
        voice=voice,
        fscale=fscale * rng.uniform(0.96, 1.04),
        glide_tau=rng.uniform(0.015, 0.05),  # portamento time constant (s)
        vib_rate=rng.uniform(5.0, 7.0),  # Hz
        vib_depth=rng.uniform(0.25, 0.7),  # semitones, peak
        vib_delay=rng.uniform(0.12, 0.3),  # s after a note's onset
        vib_mod=(rng.uniform(0.1, 0.3), rng.uniform(0, 6.3)),  # slow wobble of the vibrato rate
        jitter=rng.uniform(0.04, 0.12),  # semitones, std
        drift=rng.uniform(0.05, 0.15),
        open_q=rng.uniform(0.45, 0.7),
        tilt_hz=rng.uniform(1000.0, 4000.0),
        breathy=_db(rng.uniform(-34, -18)),
        singers_formant=bool(rng.random() < 0.5),
        presence=_db(rng.uniform(0.0, 12.0)),
    )


def _sing(rng: np.random.Generator, phrases: list[_Phrase], singer: dict, sr: int, n: int,
          breaths: bool = True) -> np.ndarray:
    """One singer's dry mono track (n,), RMS 1 over its voiced stretches."""
    # Pitch: note steps (with scoops) -> glide -> vibrato, jitter, drift.
    bp_t, bp_p = [0.0], [phrases[0].syllables[0].midi]
    vib_t, vib_v = [0.0], [0.0]
    for phrase in phrases:
        for syl in phrase.syllables:
            scoop = rng.uniform(0.3, 1.0) if rng.random() < 0.25 else 0.0
            bp_t += [syl.start, syl.start + 0.06, syl.end - 1e-4]
            bp_p += [syl.midi - scoop, syl.midi, syl.midi]
            d = syl.start + singer["vib_delay"]
            if syl.end - d > 0.1:
                vib_t += [syl.start, d, min(syl.end, d + 0.25), syl.end - 1e-4]
                vib_v += [0.0, 0.0, 1.0, 1.0]
            else:
                vib_t += [syl.start, syl.end - 1e-4]
                vib_v += [0.0, 0.0]
    # Voiced amplitude: phrase attack/release, dynamics, consonant cuts.
    amp_t, amp_v = [0.0], [0.0]

    def point(time: float, value: float) -> None:
        amp_t.append(max(time, amp_t[-1] + 1e-5))
        amp_v.append(value)

    cons_events = []
    for phrase in phrases:
        atk = rng.uniform(0.02, 0.06)
        rel = rng.uniform(0.06, 0.2)
        dyn0, dyn1 = _db(rng.uniform(-4, 2)), _db(rng.uniform(-6, 2))
        span = phrase.end - phrase.start
        prev = 0.0
        for k, syl in enumerate(phrase.syllables):
            level = (dyn0 + (dyn1 - dyn0) * (syl.start - phrase.start) / span) * _db(rng.uniform(-2, 1.5))
            onset = syl.start
            point(onset, prev)
            rise = atk if k == 0 else 0.025
            if syl.consonant is not None:
                _, _, dur, _, voiced = CONSONANTS[syl.consonant]
                dur = min(dur * rng.uniform(0.7, 1.3), 0.4 * (syl.end - syl.start))
                if voiced:  # a nasal or liquid: voicing dips but goes on
                    point(onset + min(0.01, dur / 2), 0.3 * level)
                    point(onset + dur, 0.3 * level)
                else:  # voiceless: voicing stops while the noise sounds
                    cons_events.append((onset, dur, syl.consonant, level))
                    point(onset + min(0.01, dur / 2), 0.0)
                    point(onset + dur, 0.0)
                onset += dur
                rise = 0.02
            point(onset + rise, level)
            prev = level
        point(phrase.end - rel, 0.8 * prev)
        point(phrase.end, 0.0)

    # Formant targets per syllable (with diphthongs); linear moves between them are the coarticulation.
    ft, fv = [], []
    for phrase in phrases:
        for syl in phrase.syllables:
            v1 = np.array(VOWELS[syl.vowel])
            v2 = np.array(VOWELS[syl.vowel2]) if syl.vowel2 else v1
            ft += [syl.start + 0.04, syl.start + 0.45 * (syl.end - syl.start), syl.end - 0.03]
            fv += [v1, v1, v2]
    order = np.argsort(np.asarray(ft), kind="stable")
    voice_bp = dict(
        pitch=(np.asarray(bp_t), np.asarray(bp_p)), vib=(np.asarray(vib_t), np.asarray(vib_v)),
        amp=(np.asarray(amp_t), np.asarray(amp_v)),
        formants=(np.asarray(ft)[order], np.asarray(fv)[order] * singer["fscale"]))
    # Only the stretches around phrases are synthesized (sparse songs are mostly silence).
    segments: list[list[float]] = []
    for phrase in phrases:
        s0, s1 = max(0.0, phrase.start - 0.05), min(n / sr, phrase.end + 0.05)
        if segments and s0 <= segments[-1][1]:
            segments[-1][1] = s1
        else:
            segments.append([s0, s1])
    out = np.zeros(n)
    norm_sq, norm_n = 0.0, 0
    for s0, s1 in segments:
        i0, i1 = int(s0 * sr), int(math.ceil(s1 * sr))
        seg, amp = _sing_segment(rng, i0 / sr, i1 - i0, sr, voice_bp, singer)
        out[i0:i0 + seg.shape[0]] = seg
        loud = amp > 0.05
        norm_sq += float(np.sum(seg[loud] ** 2))
        norm_n += int(loud.sum())
    voice = out / (math.sqrt(norm_sq / max(norm_n, 1)) + 1e-12)

    # Consonants: filtered noise bursts with a fast attack and a decay.
    sos_cache: dict[str, np.ndarray] = {}
    for onset, dur, name, level in cons_events:
        lo, hi, _, lev, _ = CONSONANTS[name]
        if name not in sos_cache:
            sos_cache[name] = _bandpass(lo * singer["fscale"], hi, sr)
        m = int(dur * sr)
        burst = signal.sosfilt(sos_cache[name], rng.standard_normal(m))
        burst /= burst.std() + 1e-12
        shape = _env(m, sr, [(0, 0), (min(0.008, dur / 3), 1), (0.6 * dur, 0.8), (dur, 0)])
        _add(voice, int(onset * sr), burst * shape * _db(lev) * level * 0.8)

    # Breaths before some phrases, when the gap allows.
    sos_b = _bandpass(400.0, 4000.0, sr)
    prev_end = -10.0
    for phrase in phrases if breaths else []:
        dur = rng.uniform(0.2, 0.45)
        if phrase.start - prev_end > dur + 0.2 and phrase.start - dur > 0 and rng.random() < 0.6:
            m = int(dur * sr)
            breath = signal.sosfilt(sos_b, rng.standard_normal(m))
            breath /= breath.std() + 1e-12
            shape = _env(m, sr, [(0, 0), (0.5 * dur, 1), (0.9 * dur, 0.6), (dur, 0)])
            _add(voice, int((phrase.start - dur - 0.03) * sr), breath * shape * _db(rng.uniform(-36, -28)))
        prev_end = phrase.end
    return voice


def _harmony(plan: _Plan, phrases: list[_Phrase], rng: np.random.Generator, low: int, high: int) -> list[_Phrase]:
    """A backing part: a diatonic third above or below the lead on some phrases, sometimes on "ooh"/"aah"."""
    shift = int(rng.choice([2, -2]))
    notes = plan.scale_midi(low - 12, high + 12)
    oo = rng.random() < 0.5
    vowel = str(rng.choice(["u", "a", "o"]))
    chosen = [ph for ph in phrases if rng.random() < 0.6] or [phrases[int(rng.integers(len(phrases)))]]
    out = []
    for ph in chosen:
        syls = []
        for syl in ph.syllables:
            i = int(np.argmin(np.abs(notes - syl.midi)))
            midi = float(notes[int(np.clip(i + shift, 0, len(notes) - 1))])
            syls.append(_Syllable(syl.start, syl.end, midi, vowel if oo else syl.vowel,
                                  None if oo else syl.vowel2, None if oo else syl.consonant))
        out.append(_Phrase(ph.start, ph.end, syls))
    return out


def _render_vocals(rng: np.random.Generator, plan: _Plan, activity: str, sr: int, n: int,
                   voice: str | None = None) -> tuple[np.ndarray, list[tuple[float, float]], dict]:
    """Dry stereo vocals (2, n): a lead singer (of type `voice`, else drawn), sometimes with a backing harmony; the
    sung phrases; a description."""
    drawn = str(rng.choice(list(VOICE_TYPES)))  # drawn even when `voice` is given: the phrases stay the same
    voice = voice or drawn
    low, high, _ = VOICE_TYPES[voice]
    spans = _plan_phrases(rng, plan, activity)
    phrases = _plan_melody(rng, plan, spans, low, high)
    singer = _draw_singer(rng, voice)
    info = {"voice": voice, "vibrato_hz": round(singer["vib_rate"], 2),
            "vibrato_semitones": round(singer["vib_depth"], 2), "harmony": False}
    if not phrases:
        return np.zeros((2, n)), [], info
    out = _pan(_sing(rng, phrases, singer, sr, n), rng.uniform(-0.15, 0.15))
    if rng.random() < 0.3:
        backing = _harmony(plan, phrases, rng, low, high)
        mono = _sing(rng, backing, _draw_singer(rng, voice), sr, n, breaths=False)
        out += _pan(mono * _db(rng.uniform(-10, -4)), float(rng.choice([-1, 1])) * rng.uniform(0.3, 0.7))
        info["harmony"] = True
    regions = [(round(ph.start, 4), round(ph.end, 4)) for ph in phrases]
    return out, regions, info


# --------------------------------------------------------------------------------------------------------- drums

DRUM_STYLES = {
    # 16 steps per bar: kick, snare, closed hat, open hat (1 = hit)
    "rock": ("1000000010100000", "0000100000001000", "1010101010101010", "0000000000000000"),
    "four": ("1000100010001000", "0000100000001000", "0010001000100010", "0010001000100010"),
    "half": ("1000000000100000", "0000000010000000", "1010101010101010", "0000000000000000"),
    "funk": ("1000001000100100", "0000100101001000", "1111111111111111", "0000000000000010"),
    "ballad": ("1000000010000000", "0000100000001000", "1000100010001000", "0000000000000000"),
}


def _drum_kit(rng: np.random.Generator, sr: int) -> dict[str, np.ndarray]:
    kit = {}
    # Kick: falling sine sweep with a click.
    m = int(0.6 * sr)
    t = np.arange(m) / sr
    f_hi, f_lo, tau_p = rng.uniform(100, 180), rng.uniform(42, 60), rng.uniform(0.02, 0.05)
    freq = f_lo + (f_hi - f_lo) * np.exp(-t / tau_p)
    kick = np.sin(2 * np.pi * np.cumsum(freq) / sr) * np.exp(-t / rng.uniform(0.12, 0.35))
    click = signal.sosfilt(_bandpass(1500, 8000, sr), rng.standard_normal(m)) * np.exp(-t / 0.004)
    kit["kick"] = kick + rng.uniform(0.1, 0.4) * click / (np.abs(click).max() + 1e-12)
    # Snare: two damped body partials and band-passed noise.
    m = int(0.5 * sr)
    t = np.arange(m) / sr
    body_f = rng.uniform(170, 240)
    body = (np.sin(2 * np.pi * body_f * t) + 0.5 * np.sin(2 * np.pi * body_f * 1.6 * t)) * np.exp(-t / 0.06)
    wires = signal.sosfilt(_bandpass(rng.uniform(800, 2000), 9000, sr), rng.standard_normal(m))
    wires *= np.exp(-t / rng.uniform(0.08, 0.2)) / (wires.std() + 1e-12)
    kit["snare"] = 0.5 * body + 0.35 * wires
    # Metal: six detuned square waves (808-style), high-passed.
    def metal(length: float, decay: float, cutoff: float) -> np.ndarray:
        mm = int(length * sr)
        tt = np.arange(mm) / sr
        base = rng.uniform(0.9, 1.2)
        sq = sum(np.sign(np.sin(2 * np.pi * f * base * tt + rng.uniform(0, 6.3)))
                 for f in (205.3, 304.4, 369.6, 522.7, 540.0, 800.0))
        noise = rng.standard_normal(mm)
        x = signal.sosfilt(signal.butter(4, cutoff, btype="highpass", fs=sr, output="sos"), sq + 1.5 * noise)
        return x * np.exp(-tt / decay) / (x.std() + 1e-12)
    kit["hat"] = 0.2 * metal(0.15, rng.uniform(0.02, 0.05), 7000)
    kit["open_hat"] = 0.18 * metal(0.6, rng.uniform(0.15, 0.35), 6500)
    kit["crash"] = 0.25 * metal(3.0, rng.uniform(0.8, 1.6), 4000)
    ride = metal(1.5, rng.uniform(0.5, 0.9), 5000)
    tt = np.arange(ride.shape[0]) / sr
    bell = sum(np.sin(2 * np.pi * f * tt) for f in (rng.uniform(2300, 2800), rng.uniform(3500, 4200)))
    kit["ride"] = 0.12 * ride + 0.05 * bell * np.exp(-tt / 0.4)
    # Toms: pitched sweeps.
    for name, f in (("tom_hi", rng.uniform(180, 240)), ("tom_lo", rng.uniform(90, 130))):
        m = int(0.5 * sr)
        t = np.arange(m) / sr
        sweep = f * (1 + 0.5 * np.exp(-t / 0.03))
        kit[name] = 0.6 * np.sin(2 * np.pi * np.cumsum(sweep) / sr) * np.exp(-t / 0.18)
    return kit


def _render_drums(rng: np.random.Generator, plan: _Plan, sr: int, n: int, playing: list[bool]) -> np.ndarray:
    """Stereo dry drums (2, n)."""
    kit = _drum_kit(rng, sr)
    style = str(rng.choice(list(DRUM_STYLES)))
    pattern = {k: np.array([c == "1" for c in s]) for k, s in zip(("kick", "snare", "hat", "open_hat"),
                                                                   DRUM_STYLES[style])}
    use_ride = rng.random() < 0.3
    pans = {"kick": 0.0, "snare": rng.uniform(-0.1, 0.1), "hat": rng.uniform(0.2, 0.5),
            "open_hat": rng.uniform(0.2, 0.5), "crash": rng.uniform(-0.6, -0.2), "ride": rng.uniform(0.3, 0.6),
            "tom_hi": rng.uniform(0.1, 0.4), "tom_lo": rng.uniform(-0.5, -0.2)}
    pans["open_hat"] = pans["hat"]
    stereo = {name: _pan(x, pans[name]) for name, x in kit.items()}  # (2, m) one-shots, panned once
    out = np.zeros((2, n))
    step = plan.beat / 4
    n_bars = math.ceil(plan.seconds / plan.bar)
    for b in range(n_bars):
        sec = min(int(b * plan.bar / (4 * plan.bar)), len(playing) - 1)
        if not playing[sec]:
            continue
        fill = (b % 4 == 3) and rng.random() < 0.35
        for s in range(16):
            t0 = b * plan.bar + s * step + (plan.swing * step if s % 2 else 0.0)
            t0 += rng.normal(0, 0.004)
            hits = []
            if fill and s >= 8:
                if s % 2 == 0 or rng.random() < 0.5:
                    hits.append((("snare", "tom_hi", "tom_lo")[min(2, (s - 8) // 3)], rng.uniform(0.6, 1.0)))
                if s == 8:
                    hits.append(("kick", 0.9))
            else:
                if pattern["kick"][s] or (rng.random() < 0.06 and s % 2 == 0):
                    hits.append(("kick", rng.uniform(0.8, 1.0)))
                if pattern["snare"][s]:
                    hits.append(("snare", rng.uniform(0.85, 1.0)))
                elif rng.random() < 0.04:
                    hits.append(("snare", rng.uniform(0.15, 0.3)))  # ghost note
                cym = "ride" if use_ride else "hat"
                if pattern["hat"][s] and not (s == 0 and b % 4 == 0):
                    hits.append((cym, rng.uniform(0.5, 1.0) * (1.0 if s % 4 == 0 else 0.75)))
                if pattern["open_hat"][s]:
                    hits.append(("open_hat", rng.uniform(0.6, 0.9)))
            if s == 0 and b % 4 == 0:
                hits.append(("crash", rng.uniform(0.7, 1.0)))
            for name, vel in hits:
                _add(out, int(max(0.0, t0) * sr), vel * stereo[name])
    return out


# ---------------------------------------------------------------------------------------------- pitched parts


def _adsr(m: int, sr: int, attack: float, decay: float, sustain: float, hold: float, release: float) -> np.ndarray:
    """Attack, decay to sustain; at `hold` seconds release from wherever the envelope is: (m,)."""
    bt = np.array([0.0, attack, attack + decay])
    bv = np.array([0.0, 1.0, sustain])
    level = float(np.interp(hold, bt, bv))
    keep = bt < hold
    pts = list(zip(bt[keep], bv[keep])) + [(hold, level), (hold + release, 0.0)]
    return _env(m, sr, pts)


def _note(sr: int, f0: float | np.ndarray, dur: float, timbre: dict, rng: np.random.Generator) -> np.ndarray:
    """One note of `dur` seconds plus its release: (samples,)."""
    release = timbre["release"]
    m = int((dur + release) * sr)
    if np.ndim(f0):
        f0 = np.asarray(f0)[:m]
        m = f0.shape[0]
    f_ref = float(np.max(f0))
    bright = _wavetable(_harmonics(f_ref, sr, timbre["slope"], timbre["cutoff"], odd_only=timbre.get("odd", False),
                                   extra=timbre.get("extra")))
    ph = rng.uniform(0, 1)
    x = _osc(bright, f0, m, sr, ph)
    if "dull_cutoff" in timbre:  # brightness decays: cross-fade to a darker table
        dull = _wavetable(_harmonics(f_ref, sr, timbre["slope"] + 0.5, timbre["dull_cutoff"]))
        w = np.exp(-np.arange(m) / (timbre["bright_tau"] * sr))
        x = x * w + _osc(dull, f0, m, sr, ph) * (1 - w)
    if timbre.get("detune"):
        cents = timbre["detune"]
        x = 0.5 * (x + _osc(bright, np.asarray(f0) * 2 ** (cents / 1200), m, sr, rng.uniform(0, 1)))
    env = _adsr(m, sr, timbre["attack"], timbre["decay"], timbre["sustain"], dur, release)
    return x * env


def _render_bass(rng: np.random.Generator, plan: _Plan, sr: int, n: int, playing: list[bool],
                 kind: str | None = None) -> tuple[np.ndarray, str]:
    drawn = str(rng.choice(BASS_KINDS))  # drawn even when `kind` is given, so the draws after it stay the same
    kind = kind or drawn
    timbre = {
        "finger": dict(slope=1.2, cutoff=rng.uniform(700, 1500), dull_cutoff=300, bright_tau=0.08, attack=0.005,
                       decay=0.4, sustain=0.5, release=0.05),
        "synth": dict(slope=1.0, cutoff=rng.uniform(400, 1200), attack=0.005, decay=0.2, sustain=0.7,
                      release=0.04),
        "sub": dict(slope=2.5, cutoff=300, attack=0.01, decay=0.3, sustain=0.8, release=0.06),
    }[kind]
    rhythm = str(rng.choice(["whole", "half", "quarter", "eighth", "syncopated"]))
    beats = {"whole": [0, 4], "half": [0, 2, 4], "quarter": [0, 1, 2, 3, 4], "eighth": list(np.arange(0, 4.5, 0.5)),
             "syncopated": [0, 0.75, 1.5, 2.5, 3, 3.5, 4]}[rhythm]
    out = np.zeros(n)
    for chord in plan.chords:
        if chord.start >= plan.seconds:
            break
        sec = min(int(chord.start / (4 * plan.bar)), len(playing) - 1)
        if not playing[sec]:
            continue
        root = 28 + (chord.root_pc - 4) % 12  # E1..D#2
        n_beats = (chord.end - chord.start) / plan.beat
        onsets = [b for bar0 in np.arange(0, n_beats, 4) for b in (bar0 + np.array(beats[:-1]))
                  if b < n_beats]
        ends = onsets[1:] + [n_beats]
        for i, (b0, b1) in enumerate(zip(onsets, ends)):
            r = rng.random()
            midi = root + (12 if r < 0.1 else 7 if r < 0.2 else 0) if i else root
            if i == len(onsets) - 1 and rng.random() < 0.2:  # approach note into the next chord
                midi = root + int(rng.choice([-1, 2, 5]))
            dur = (b1 - b0) * plan.beat * rng.uniform(0.7, 0.95)
            x = _note(sr, float(_midi_to_hz(midi)), dur, timbre, rng) * rng.uniform(0.8, 1.0)
            _add(out, int((chord.start + b0 * plan.beat) * sr), x)
    return _pan(out, 0.0), kind


def _voicing(chord: _Chord, low: int, high: int, rng: np.random.Generator) -> list[int]:
    """Chord tones as MIDI numbers in [low, high], close position from a random inversion."""
    base = low + (chord.root_pc - low) % 12
    notes = sorted(base + (pc - chord.root_pc) % 12 for pc in chord.tones)
    inv = int(rng.integers(len(notes)))
    notes = notes[inv:] + [x + 12 for x in notes[:inv]]
    while notes[-1] > high:
        notes = [x - 12 for x in notes]
    return [x for x in notes if x >= low - 12]


def _render_other(rng: np.random.Generator, plan: _Plan, sr: int, n: int, sections: int,
                  vocal_spans: list[tuple[float, float]]) -> tuple[np.ndarray, list[str]]:
    """Stereo harmonic instruments (2, n) and their names."""
    pool = ["pad", "pluck", "keys", "organ", "lead"]
    k = int(rng.integers(1, 4))
    chosen = [str(c) for c in rng.choice(pool, size=k, replace=False)]
    if "lead" not in chosen and rng.random() < 0.4:
        chosen.append("lead")
    if not any(c in chosen for c in ("pad", "keys", "organ", "pluck")):
        chosen.append(str(rng.choice(["pad", "keys"])))
    out = np.zeros((2, n))
    for inst in chosen:
        playing = [rng.random() < 0.8 for _ in range(sections)]
        playing[0] = playing[0] or not any(playing)
        pan = rng.uniform(-0.7, 0.7)
        if inst == "lead":
            track, _ = _render_lead(rng, plan, sr, n, vocal_spans, pan)
        else:
            mono = np.zeros(n)
            timbre = {
                "pad": dict(slope=1.0, cutoff=rng.uniform(1500, 4000), attack=rng.uniform(0.1, 0.5), decay=0.5,
                            sustain=0.8, release=rng.uniform(0.3, 0.8), detune=rng.uniform(6, 14)),
                "pluck": dict(slope=1.0, cutoff=rng.uniform(3000, 7000), dull_cutoff=600,
                              bright_tau=rng.uniform(0.04, 0.12), attack=0.002, decay=rng.uniform(0.2, 0.6),
                              sustain=0.0, release=0.1),
                "keys": dict(slope=1.6, cutoff=rng.uniform(2000, 5000), dull_cutoff=800, bright_tau=0.15,
                             extra={7: 0.15, 14: 0.08}, attack=0.003, decay=rng.uniform(0.6, 1.5), sustain=0.2,
                             release=0.15),
                "organ": dict(slope=3.0, cutoff=5000, extra={2: 0.5, 4: 0.3, 8: 0.2}, attack=0.01, decay=0.05,
                              sustain=1.0, release=0.05),  # drawbars: 8', 4', 2' and 1' over the fundamental
            }[inst]
            low = {"pad": 52, "pluck": 57, "keys": 53, "organ": 50}[inst]
            arp = inst == "pluck"
            rhythm = float(rng.choice([0.5, 1.0, 2.0])) if inst in ("keys", "organ") else 0.5
            for chord in plan.chords:
                if chord.start >= plan.seconds:
                    break
                sec = min(int(chord.start / (4 * plan.bar)), sections - 1)
                if not playing[sec]:
                    continue
                notes = _voicing(chord, low, low + 16, rng)
                length = chord.end - chord.start
                if inst == "pad":
                    for m in notes:
                        x = _note(sr, float(_midi_to_hz(m)), length, timbre, rng)
                        _add(mono, int(chord.start * sr), 0.5 * x)
                elif arp:
                    seq = notes + [notes[0] + 12] if rng.random() < 0.5 else notes
                    step = plan.beat * rhythm
                    for i, t0 in enumerate(np.arange(chord.start, chord.end - 1e-6, step)):
                        m = seq[i % len(seq)] if rng.random() < 0.85 else int(rng.choice(seq))
                        x = _note(sr, float(_midi_to_hz(m)), step, timbre, rng)
                        _add(mono, int((t0 + rng.normal(0, 0.003)) * sr), rng.uniform(0.6, 1.0) * x)
                else:
                    step = plan.beat * rhythm
                    for t0 in np.arange(chord.start, chord.end - 1e-6, step):
                        vel = rng.uniform(0.6, 1.0)
                        for m in notes:
                            x = _note(sr, float(_midi_to_hz(m)), 0.9 * step, timbre, rng)
                            _add(mono, int(t0 * sr), 0.4 * vel * x)
            if inst == "pad":  # wide: two slightly different copies left and right
                delayed = np.concatenate([np.zeros(int(0.012 * sr)), mono])[:n]
                track = np.stack([mono, delayed]) * 0.7
            else:
                track = _pan(mono, pan)
        rms = _rms(track)
        if rms > 0:
            out += track / rms * _db(rng.uniform(-4, 0))
    return out, chosen


LEAD_KINDS = ("saw", "square", "flute", "string")
# Hard negatives for the vocal model: leads in the singing range (fundamentals ~220 Hz-1.3 kHz) with vibrato and
# glides, answering the singer in the gaps - pitched, expressive, but no formants and no consonants.
HARD_LEAD_KINDS = ("saw", "square", "flute", "string", "sax", "whistle", "guitar")


def _render_lead(rng: np.random.Generator, plan: _Plan, sr: int, n: int, vocal_spans: list[tuple[float, float]],
                 pan: float, kinds: Sequence[str] = LEAD_KINDS, low_range: tuple[int, int] = (55, 67),
                 answer_prob: float = 0.5) -> tuple[np.ndarray, str]:
    """A monophonic lead with vibrato and portamento but a fixed (non-vocal) timbre: (2, n), and its kind."""
    kind = str(rng.choice(list(kinds)))
    low = int(rng.integers(*low_range))
    notes = plan.scale_midi(low, low + 14)
    timbre = {
        "saw": dict(slope=1.0, cutoff=rng.uniform(1500, 4000)),
        "square": dict(slope=1.0, cutoff=rng.uniform(1500, 4000), odd=True),
        "flute": dict(slope=3.0, cutoff=2500),
        "string": dict(slope=1.0, cutoff=rng.uniform(2000, 3500)),
    }.get(kind)
    if timbre is None:  # the hard-negative kinds draw nothing above, so the classic leads keep their streams
        timbre = {
            "sax": dict(slope=1.2, cutoff=3500, extra={2: 0.6, 3: 0.5}),
            "whistle": dict(slope=8.0, cutoff=2000),
            "guitar": dict(slope=1.0, cutoff=3000),
        }[kind]
    # Phrases: in the vocal gaps (call and response) or anywhere.
    answer = rng.random() < answer_prob and len(vocal_spans) > 0
    phrases = []
    if answer:
        for (s0, e0), (s1, _) in zip(vocal_spans, vocal_spans[1:] + [(plan.seconds, plan.seconds)]):
            if s1 - e0 > 1.0:
                phrases.append((e0 + 0.2, min(s1 - 0.2, e0 + 0.2 + rng.uniform(1.0, 4.0))))
    else:
        t = rng.uniform(0, 2)
        while t < plan.seconds - 1:
            length = rng.uniform(1.0, 5.0)
            phrases.append((t, min(plan.seconds, t + length)))
            t += length + rng.uniform(0.5, 4.0)
    vib_rate, vib_depth = rng.uniform(5.0, 7.0), rng.uniform(0.2, 0.6)
    glide = math.exp(-1.0 / (rng.uniform(0.01, 0.04) * sr))
    out = np.zeros(n)
    idx = len(notes) // 2
    for p0, p1 in phrases:
        bp_t, bp_p = [], []
        t = p0
        while t < p1 - 0.05:
            d = min(p1 - t, float(rng.choice([0.5, 1.0, 1.5, 2.0])) * plan.beat)
            idx = int(np.clip(idx + rng.integers(-2, 3), 0, len(notes) - 1))
            bp_t += [t, t + d - 1e-4]
            bp_p += [float(notes[idx])] * 2
            t += d
        if not bp_t:
            continue
        m = int((p1 - p0 + 0.1) * sr)
        tt = p0 + np.arange(m) / sr
        target = np.interp(tt, bp_t, bp_p)
        pitch = signal.lfilter([1 - glide], [1, -glide], target, zi=[target[0] * glide])[0]
        vib_env = np.clip((tt - p0 - 0.2) / 0.3, 0, 1)
        pitch += vib_depth * vib_env * np.sin(2 * np.pi * vib_rate * (tt - p0))
        f0 = _midi_to_hz(pitch)
        tim = dict(timbre, attack=0.04, decay=0.1, sustain=0.9, release=0.1)
        x = _note(sr, f0, p1 - p0, tim, rng)
        if kind in ("flute", "sax"):  # breathy, but without formants
            x += 0.05 * signal.sosfilt(_bandpass(1000, 6000, sr), rng.standard_normal(x.shape[0])) * (
                np.abs(x) > 0).astype(float)
        elif kind == "guitar":  # overdriven
            x = np.tanh(4.0 * x / (np.abs(x).max() + 1e-9)) * np.abs(x).max()
        _add(out, int(p0 * sr), x)
    return _pan(out, pan), kind


# -------------------------------------------------------------------------------------------------------- reverb


def _reverb_ir(rng: np.random.Generator, sr: int, rt60: float) -> np.ndarray:
    """Stereo impulse response (2, m): early reflections and a noise tail whose highs decay faster."""
    m = int(min(rt60, 2.5) * sr)
    t = np.arange(m) / sr
    pre = rng.uniform(0.008, 0.03)
    noise = rng.standard_normal((2, m))
    sos = signal.butter(1, 3000, fs=sr, output="sos")
    low = signal.sosfilt(sos, noise, axis=-1)
    high = noise - low
    gate = (t >= pre).astype(float)
    tail = (low * np.exp(-6.9 * t / rt60) + high * np.exp(-6.9 * t / (0.45 * rt60))) * gate
    tail /= np.sqrt(np.sum(tail ** 2, axis=-1, keepdims=True)) + 1e-12
    ir = tail
    for _ in range(8):
        d = int(rng.uniform(0.004, pre + 0.04) * sr)
        if d < m:
            ir[int(rng.integers(2)), d] += rng.uniform(0.1, 0.35)
    return ir


def _apply_reverb(stems: dict[str, np.ndarray], ir: np.ndarray, wets: dict[str, float]) -> None:
    """In place: stem (2, n) -> stem + wet * reverb(mono send), same length, for every stem with wet > 0.

    One FFT of the impulse response serves every stem (float32 FFTs: the tail sits far below the dry signal).
    """
    names = [k for k, w in wets.items() if w > 0 and np.any(stems[k])]
    if not names:
        return
    n = next(iter(stems.values())).shape[-1]
    size = sp_fft.next_fast_len(n + ir.shape[-1] - 1, real=True)
    ir_spec = sp_fft.rfft(ir.astype(np.float32), size, axis=-1)  # (2, bins)
    for name in names:
        send = (0.5 * wets[name] * (stems[name][0] + stems[name][1])).astype(np.float32)
        rev = sp_fft.irfft(sp_fft.rfft(send, size)[None, :] * ir_spec, size, axis=-1)[:, :n]  # (2, n)
        stems[name] = stems[name] + rev


# --------------------------------------------------------------------------------------------------------- songs


@dataclass
class Song:
    """A synthesized song.

    Attributes:
        sample_rate: Hz.
        stems: name -> (channels, time) float32, for names in STEMS.
        mixture: (channels, time) float32, the sum of the stems.
        vocal_regions: sung phrases [(start_s, end_s), ...], sorted and disjoint.
        info: what was drawn (key, tempo, voice type, instruments, ...), JSON-serialisable.
    """

    sample_rate: int
    stems: dict[str, np.ndarray]
    mixture: np.ndarray
    vocal_regions: list[tuple[float, float]]
    info: dict

    @property
    def seconds(self) -> float:
        return self.mixture.shape[-1] / self.sample_rate

    def vocal_mask(self, hop: int = 1) -> np.ndarray:
        """(ceil(time / hop),) bool, True where a sampled frame lies inside a sung phrase."""
        n = self.mixture.shape[-1]
        t = np.arange(0, n, hop) / self.sample_rate
        mask = np.zeros(t.shape[0], dtype=bool)
        for s, e in self.vocal_regions:
            mask |= (t >= s) & (t < e)
        return mask


def _rng(seed: int | Sequence[int], part: int) -> np.random.Generator:
    entropy = [int(seed)] if np.ndim(seed) == 0 else [int(s) for s in seed]
    return np.random.default_rng(np.random.SeedSequence(entropy + [part]))


def generate_song(seed: int | Sequence[int], seconds: float = 30.0, vocal_activity: str = "mixed",
                  sample_rate: int = SAMPLE_RATE, bass_kind: str | None = None, voice: str | None = None) -> Song:
    """Synthesize one song from a seed.

    Args:
        seed: a non-negative int, or a sequence of them (e.g. (base_seed, track_index)).
        seconds: length of the song (>= 1).
        vocal_activity: "sparse", "mixed" or "dense"; "none" (no vocals); "varied" (drawn per song, see VARIED).
        sample_rate: Hz (>= 16000).
        bass_kind: one of BASS_KINDS instead of the drawn bass timbre, for controlled comparisons: the bass plays
            the same notes and every other draw of the song stays the same (the stems' levels follow the new bass).
        voice: one of VOICE_TYPES instead of the drawn voice type, for controlled comparisons: the same phrases
            (`vocal_regions`) sung by another singer, on a melody in that voice's range; the other stems stay.
    Returns:
        Song with stereo float32 stems that sum to the mixture.
    """
    if bass_kind is not None and bass_kind not in BASS_KINDS:
        raise ValueError(f"bass_kind must be one of {', '.join(BASS_KINDS)}, not {bass_kind!r}")
    if voice is not None and voice not in VOICE_TYPES:
        raise ValueError(f"voice must be one of {', '.join(VOICE_TYPES)}, not {voice!r}")
    if vocal_activity not in MODES:
        raise ValueError(f"vocal_activity must be one of {', '.join(MODES)}, not {vocal_activity!r}")
    if not seconds >= 1.0:
        raise ValueError(f"seconds must be at least 1, got {seconds}")
    if sample_rate < 16000:
        raise ValueError(f"sample_rate must be at least 16000 Hz, got {sample_rate}")
    sr = int(sample_rate)
    n = int(round(seconds * sr))
    plan = _make_plan(_rng(seed, 0), seconds)
    rng_arr = _rng(seed, 1)
    n_sec = len(plan.sections)
    drums_on = [rng_arr.random() < 0.88 for _ in range(n_sec)]
    bass_on = [rng_arr.random() < 0.9 for _ in range(n_sec)]
    if rng_arr.random() < 0.05:
        drums_on = [False] * n_sec  # a song without drums

    variety = _draw_variety(_rng(seed, 7)) if vocal_activity == "varied" else None
    activity = variety["activity"] if variety else vocal_activity
    if activity == "none":
        vocal, regions, vinfo = np.zeros((2, n)), [], {"voice": None, "harmony": False}
    else:
        vocal, regions, vinfo = _render_vocals(_rng(seed, 2), plan, activity, sr, n, voice)
    drums = _render_drums(_rng(seed, 3), plan, sr, n, drums_on)
    bass, bass_kind = _render_bass(_rng(seed, 4), plan, sr, n, bass_on, bass_kind)
    other, instruments = _render_other(_rng(seed, 5), plan, sr, n, n_sec, regions)
    if variety and variety["hard_lead"]:
        lead_rng = _rng(seed, 8)
        lead, kind = _render_lead(lead_rng, plan, sr, n, regions, lead_rng.uniform(-0.5, 0.5), HARD_LEAD_KINDS,
                                  (57, 74), VARIED["hard_lead_answer_prob"])
        r_lead, r_other = _rms(lead, np.abs(lead).max(axis=0) > 1e-4 * (np.abs(lead).max() + 1e-12)), _rms(other)
        if r_lead > 0:
            other = other + lead / r_lead * max(r_other, 1e-3) * _db(variety["hard_lead_db"])
            instruments = instruments + [f"hard lead ({kind})"]

    rng = _rng(seed, 6)
    stems = {"vocals": vocal, "drums": drums, "bass": bass, "other": other}
    # Balance: each accompaniment stem to a reference level over where it plays, then a random offset.
    offsets = {"drums": rng.uniform(-3, 3), "bass": rng.uniform(-5, 1), "other": rng.uniform(-4, 2)}
    for name, off in offsets.items():
        x = stems[name]
        playing = np.abs(x).max(axis=0) > 1e-4 * (np.abs(x).max() + 1e-12)
        r = _rms(x, playing)
        if r > 0:
            stems[name] = x / r * 0.1 * _db(off)
    # Reverb: a hall for vocals and other, a short room for drums; bass stays dry.
    hall = _reverb_ir(rng, sr, rng.uniform(0.5, 2.2) if variety is None else variety["hall_rt60_s"])
    vocal_wet = rng.uniform(-16, -6) if variety is None else variety["vocal_reverb_db"]
    _apply_reverb(stems, hall, {"vocals": _db(vocal_wet), "other": _db(rng.uniform(-14, -5))})
    room = _reverb_ir(rng, sr, rng.uniform(0.15, 0.4))
    _apply_reverb(stems, room, {"drums": _db(rng.uniform(-18, -8))})
    # Vocal level relative to the accompaniment, measured over the sung phrases.
    mask = np.zeros(n, dtype=bool)
    for s, e in regions:
        mask[int(s * sr):int(e * sr)] = True
    vocal_ratio = rng.uniform(-5, 3) if variety is None else variety["vocal_to_accompaniment_db"]
    accomp = stems["drums"] + stems["bass"] + stems["other"]
    r_acc = _rms(accomp, mask) if mask.any() else _rms(accomp)
    r_voc = _rms(stems["vocals"], mask)
    if r_voc > 0 and r_acc > 0:
        stems["vocals"] *= r_acc / r_voc * _db(vocal_ratio)
    # Final level: the mixture's peak in [0.4, 0.9]; no stem may clip either.
    mixture = sum(stems[name] for name in STEMS)
    peak = float(np.abs(mixture).max())
    stem_peak = max(float(np.abs(stems[k]).max()) for k in STEMS)
    gain = rng.uniform(0.4, 0.9) / max(peak, 1e-9)
    gain = min(gain, 0.95 / max(stem_peak, 1e-9))
    out = {name: (stems[name] * gain).astype(np.float32) for name in STEMS}
    mix = out["vocals"] + out["drums"] + out["bass"] + out["other"]
    info = {
        "seed": [int(seed)] if np.ndim(seed) == 0 else [int(s) for s in seed],
        "seconds": seconds,
        "vocal_activity": vocal_activity,
        "key": NOTE_NAMES[plan.key] + (" minor" if plan.minor else " major"),
        "tempo_bpm": round(plan.tempo, 2),
        "bass": bass_kind,
        "other": instruments,
        "vocal_to_accompaniment_db": round(vocal_ratio, 2),
        **vinfo,
    }
    if vocal_activity == "varied":
        info["drawn_activity"] = activity
        info["vocal_reverb_db"] = round(vocal_wet, 2)
    log.debug("song %s: %s", info["seed"], info)
    return Song(sr, out, mix, regions, info)


def _draw_variety(rng: np.random.Generator) -> dict:
    """The per-song settings of the "varied" mode (its own random stream, so the classic modes are unchanged)."""
    names, weights = zip(*VARIED["activity"].items())
    return {
        "activity": str(rng.choice(names, p=np.array(weights) / sum(weights))),
        "vocal_to_accompaniment_db": float(rng.uniform(*VARIED["vocal_to_accompaniment_db"])),
        "vocal_reverb_db": float(rng.uniform(*VARIED["vocal_reverb_db"])),
        "hall_rt60_s": float(rng.uniform(*VARIED["hall_rt60_s"])),
        "hard_lead": bool(rng.random() < VARIED["hard_lead_prob"]),
        "hard_lead_db": float(rng.uniform(*VARIED["hard_lead_db"])),
    }


class SynthDataset:
    """Endless stream of synthesized training excerpts; `dataset[i]` is deterministic in (seed, i).

    The same item format as `bsmamba2.data.mixing.RandomMixDataset`, so training can run with no files at all.
    Item i is excerpt `i % per_song` of song `i // per_song`, where a song is `song_seconds` long (default: one
    segment) and holds `per_song` back-to-back segments; the last song is cached, so the consecutive indices of a
    batch share one song. Songs alternate between the activity patterns listed in `vocal_activity`.

    Args:
        segment: excerpt length in samples.
        targets: stems the model predicts, e.g. ("vocals",).
        channels: 1 (the mean of the stereo stems) or 2.
        seed: base seed of the stream.
        vocal_activity: one pattern or a sequence of them, drawn at random per song.
        song_seconds: length of each synthesized song (>= segment / sample_rate).
        sample_rate: Hz.
    Item:
        mixture (channels, segment) float32 tensor, targets (len(targets), channels, segment) float32 tensor.
    """

    def __init__(self, segment: int, targets: Sequence[str] = ("vocals",), channels: int = 2, seed: int = 0,
                 vocal_activity: str | Sequence[str] = ("sparse", "mixed", "dense"), song_seconds: float | None = None,
                 sample_rate: int = SAMPLE_RATE):
        activities = (vocal_activity,) if isinstance(vocal_activity, str) else tuple(vocal_activity)
        bad = [a for a in activities if a not in MODES]
        if bad or not activities:
            raise ValueError(f"vocal_activity must be among {', '.join(MODES)}, got {list(activities)}")
        unknown = [t for t in targets if t not in STEMS]
        if unknown or not targets:
            raise ValueError(f"targets must be among {', '.join(STEMS)}, got {list(targets)}")
        if channels not in (1, 2):
            raise ValueError(f"channels must be 1 or 2, got {channels}")
        self.segment = int(segment)
        seconds = self.segment / sample_rate if song_seconds is None else float(song_seconds)
        if seconds < max(1.0, self.segment / sample_rate):
            raise ValueError(f"song_seconds must be at least max(1, segment / sample_rate), got {seconds}")
        self.song_seconds = seconds
        self.per_song = int(round(seconds * sample_rate)) // self.segment
        self.targets, self.channels, self.seed = tuple(targets), channels, int(seed)
        self.activities, self.sample_rate = activities, int(sample_rate)
        self._cache: tuple[int, Song] | None = None

    def __len__(self) -> int:
        return 2**62  # an index space, not a size: the stream is endless

    def song(self, number: int) -> Song:
        if self._cache is None or self._cache[0] != number:
            pick = np.random.default_rng([self.seed, number, 7]).integers(len(self.activities))
            song = generate_song((self.seed, 3, number), self.song_seconds, self.activities[int(pick)],
                                 self.sample_rate)
            self._cache = (number, song)
        return self._cache[1]

    def __getitem__(self, index: int):
        import torch

        song = self.song(int(index) // self.per_song)
        start = (int(index) % self.per_song) * self.segment
        cut = slice(start, start + self.segment)
        sources = np.stack([song.stems[t][:, cut] for t in self.targets])  # (targets, 2, segment)
        mixture = song.mixture[:, cut]  # (2, segment)
        if self.channels == 1:
            sources, mixture = sources.mean(axis=1, keepdims=True), mixture.mean(axis=0, keepdims=True)
        return torch.from_numpy(np.ascontiguousarray(mixture)), torch.from_numpy(np.ascontiguousarray(sources))
