"""Planted-evidence clips: speech-like audio whose class is written into a known
time–frequency region, so that an explanation can be scored against the truth.

    clips = generate(512, seed=0)                     # 2 s at 16 kHz, 4 classes
    clips.waves [512, 32000], clips.labels [512]
    clips.sample_mask()              [512, 32000] bool: where the evidence sounds
    clips.feature_mask(m)            [512, 80, 200] bool for a Whisper model (its layout)
    clips.distractor_feature_mask(m) the same for the class-independent distractors

The rule. The range ``f_lo .. f_hi`` (400–7000 Hz) is cut into ``2 * n_classes``
bands of equal width on the mel scale; even bands ``2k`` belong to class ``k``,
odd bands are distractor bands (:func:`bands`). A clip of class ``k`` holds one
*evidence burst* in band ``2k``: three gliding partials (a chirped tone complex)
inside the middle 60 % of the band, 150–250 ms long, at a random time. Every clip
also holds ``n_distractors`` bursts of the same kind in randomly chosen distractor
bands at random times, independent of the class. The label is decided by the
evidence burst alone.

The background is speech-like: syllables of voiced sound (harmonics of a gliding
f0 of 90–240 Hz shaped by three moving formants), fricative noise and silences,
over a faint noise floor. Each burst's level is ``evidence_db`` (default −8..−2 dB)
relative to the speech's RMS: visible, but it does not dominate the clip.

Reproducible: one ``numpy.random.Generator`` per clip, derived from
``SeedSequence(seed)``; no global state. Clip ``i`` depends only on ``seed``, ``i``
and its label; labels are balanced (each class ``n // n_classes`` or one more times)
and shuffled by the same seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxspeech.frontends.spectral import hz_to_mel, mel_to_hz

__all__ = ["Planted", "generate", "bands", "tf_mask", "filter_edges"]

BURST_SECONDS = (0.15, 0.25)
PARTIALS = 3
GUARD = 0.2  # partials stay this fraction of the band's width away from its edges


def bands(n_classes: int = 4, f_lo: float = 400.0, f_hi: float = 7000.0) -> np.ndarray:
    """``[2 * n_classes, 2]`` band edges in Hz, equal widths on the (slaney) mel scale:
    row ``2k`` is class ``k``'s band, row ``2k + 1`` a distractor band."""
    edges = mel_to_hz(np.linspace(hz_to_mel(f_lo), hz_to_mel(f_hi), 2 * n_classes + 1))
    return np.stack([edges[:-1], edges[1:]], axis=1)


@dataclasses.dataclass(frozen=True)
class Planted:
    """A batch of planted clips and where their evidence is.

    ``waves [N, samples]`` float32 at ``sample_rate``; ``labels [N]`` int32;
    ``spans [N, 2]`` the evidence burst's ``[start, end)`` in samples; ``freqs [N, 2]``
    the lowest and highest frequency (Hz) its partials reach; ``distractor_spans``
    and ``distractor_freqs`` ``[N, n_distractors, 2]`` the same for the distractors;
    ``class_bands [n_classes, 2]`` the rule (Hz). With ``generate(..., parts=True)``,
    ``evidence`` and ``distractors [N, samples]`` hold the evidence burst and the sum of
    the distractor bursts exactly as they are mixed into ``waves`` (``waves - evidence``
    is the clip with its evidence removed); ``None`` otherwise.
    """

    waves: np.ndarray
    labels: np.ndarray
    spans: np.ndarray
    freqs: np.ndarray
    distractor_spans: np.ndarray
    distractor_freqs: np.ndarray
    class_bands: np.ndarray
    sample_rate: int
    seed: int
    evidence: np.ndarray | None = None
    distractors: np.ndarray | None = None

    @property
    def n_classes(self) -> int:
        return len(self.class_bands)

    def __len__(self) -> int:
        return len(self.labels)

    def sample_mask(self) -> np.ndarray:
        """``[N, samples]`` bool: the samples the evidence burst occupies."""
        return _span_mask(self.spans[:, None], self.waves.shape[-1])

    def distractor_sample_mask(self) -> np.ndarray:
        """``[N, samples]`` bool: the samples any distractor burst occupies."""
        return _span_mask(self.distractor_spans, self.waves.shape[-1])

    def feature_mask(self, model) -> np.ndarray:
        """The evidence region in ``model``'s feature layout (bool), e.g. Whisper
        ``[N, n_mels, frames]``, ECAPA ``[N, frames, n_mels]``; see :func:`tf_mask`."""
        return tf_mask(model, self.spans[:, None], self.freqs[:, None], self.waves.shape[-1])

    def distractor_feature_mask(self, model) -> np.ndarray:
        """The distractors' regions in ``model``'s feature layout (bool)."""
        return tf_mask(model, self.distractor_spans, self.distractor_freqs, self.waves.shape[-1])


def _span_mask(spans: np.ndarray, n: int) -> np.ndarray:
    """``spans [N, K, 2]`` -> ``[N, n]``: inside any of the K ``[start, end)``."""
    t = np.arange(n)
    inside = (t >= spans[..., :1]) & (t < spans[..., 1:])  # [N, K, n]
    return inside.any(axis=1)


# --- feature layouts -------------------------------------------------------------------

def filter_edges(filters: np.ndarray, sample_rate: int) -> np.ndarray:
    """``filters [n_freqs, n_mels]`` (a front end's mel matrix) -> ``[n_mels, 2]``: the
    lowest and highest FFT-bin frequency each filter responds to (its support)."""
    freqs = np.linspace(0, sample_rate / 2, filters.shape[0])
    edges = np.zeros((filters.shape[1], 2))
    for m in range(filters.shape[1]):
        nz = np.flatnonzero(filters[:, m] > 0)
        edges[m] = (freqs[nz[0]], freqs[nz[-1]]) if nz.size else (np.inf, -np.inf)
    return edges


def _front_end(model) -> tuple[np.ndarray, int, int, int, str]:
    """``(filters [n_freqs, n_mels], n_fft, hop, frames, layout)`` of a model's front end."""
    config = getattr(model, "config", model)
    name = type(config).__name__
    if name == "WhisperConfig":
        from jaxspeech.frontends import whisper as fe

        return (np.asarray(fe.mel_filters(config.n_mels)), fe.N_FFT, fe.HOP_LENGTH,
                config.n_frames, "mel_time")
    if name == "EcapaConfig":
        from jaxspeech.frontends import fbank as fe

        fb = fe.filterbank(config.n_mels, config.n_fft, config.sample_rate, config.f_min,
                           config.f_max)
        return fb, config.n_fft, config.hop_length, -1, "time_mel"
    raise ValueError(f"planted masks know the Whisper and ECAPA front ends, not {name}; "
                     "use tf_mask with a model of those, or sample_mask() for the waveform")


def tf_mask(model, spans: np.ndarray, freqs: np.ndarray, n_samples: int) -> np.ndarray:
    """Regions ``spans [N, K, 2]`` (samples) × ``freqs [N, K, 2]`` (Hz) -> a bool mask in the
    features' layout of ``model`` (a :class:`~jaxspeech.Model` or its config).

    Frame ``t`` (centred STFT, hop ``h``) is in a region when its centre ``t * h`` lies
    in the span; mel channel ``m`` is when its filter's support (:func:`filter_edges`,
    from the front end's own mel matrix) overlaps the frequency range widened by the
    analysis window's main lobe (2 FFT bins each side: where a tone's energy leaks). Whisper:
    ``[N, n_mels, frames]`` (frames = the model's window; parts of the clip past it
    are dropped); ECAPA: ``[N, 1 + n_samples // hop, n_mels]``.
    """
    filters, n_fft, hop, frames, layout = _front_end(model)
    config = getattr(model, "config", model)
    sr = getattr(config, "sample_rate", 16000)
    edges = filter_edges(filters, sr)  # [M, 2]
    if frames < 0:
        frames = 1 + n_samples // hop
    centre = np.arange(frames) * hop
    in_time = (centre >= spans[..., :1]) & (centre < spans[..., 1:])  # [N, K, T]
    lobe = 2 * sr / n_fft
    in_freq = (edges[:, 1] >= freqs[..., :1] - lobe) & (edges[:, 0] <= freqs[..., 1:] + lobe)
    mask = (in_freq[..., :, None] & in_time[..., None, :]).any(axis=1)  # [N, M, T]
    return mask if layout == "mel_time" else np.swapaxes(mask, 1, 2)


# --- synthesis -------------------------------------------------------------------------

def _smooth_track(rng: np.random.Generator, n: int, lo: float, hi: float, knots: int) -> np.ndarray:
    """A slowly moving value in ``[lo, hi]`` at ``n`` points: random knots joined by
    cosine steps (computed on a coarse grid and interpolated: it moves slowly)."""
    values = rng.uniform(lo, hi, knots)
    x = np.linspace(0, knots - 1, min(n, 64 * knots))
    i = np.minimum(x.astype(int), knots - 2)
    frac = 0.5 - 0.5 * np.cos(np.pi * (x - i))
    coarse = values[i] * (1 - frac) + values[i + 1] * frac
    return np.interp(np.linspace(0, knots - 1, n), x, coarse)


def _ramp(n: int, sr: int, ramp_s: float = 0.01) -> np.ndarray:
    """A raised-cosine on/off envelope of ``n`` samples (no clicks, so no broadband edges)."""
    r = max(1, min(int(ramp_s * sr), n // 2))
    env = np.ones(n)
    up = 0.5 - 0.5 * np.cos(np.pi * np.arange(r) / r)
    env[:r], env[n - r:] = up, up[::-1]
    return env


def _formant_filter(source: np.ndarray, formants, sr: int, n_fft: int = 512) -> np.ndarray:
    """Shape ``source`` by moving ``formants`` (``(track over the STFT frames, bandwidth)``
    pairs): per-frame gains in the STFT domain; sqrt-Hann analysis and synthesis at
    50 % overlap reconstruct exactly, and the whole filter is O(n log n)."""
    n, hop = source.size, n_fft // 2
    win = np.sqrt(0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft))
    blocks = -(-n // hop) + 1  # hop-sized blocks of the padded signal
    padded = np.zeros((blocks + 1) * hop)
    padded[hop:hop + n] = source
    halves = padded.reshape(-1, hop)
    frames = np.concatenate([halves[:-1], halves[1:]], axis=1) * win  # [blocks, n_fft]
    f = np.fft.rfftfreq(n_fft, 1 / sr)
    gain = sum(1.0 / (1.0 + ((f[None, :] - fc[:, None]) / bw) ** 2) for fc, bw in formants)
    out = np.fft.irfft(np.fft.rfft(frames, axis=1) * gain, n_fft, axis=1) * win
    # overlap-add: block j gets the second half of frame j-1 and the first half of frame j
    added = np.zeros((blocks + 1, hop))
    added[:-1] += out[:, :hop]
    added[1:] += out[:, hop:]
    return added.reshape(-1)[hop:hop + n]


def n_formant_frames(n: int, n_fft: int = 512) -> int:
    return -(-n // (n_fft // 2)) + 1


def _speech(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Syllables of voiced sound (moving f0 and formants), fricatives and silences."""
    t = np.arange(n) / sr
    seconds = n / sr
    f0 = _smooth_track(rng, n, 90.0, 240.0, 2) * (1 + 0.08 * np.sin(
        2 * np.pi * rng.uniform(2, 5) * t + rng.uniform(0, 2 * np.pi)))
    knots = max(2, int(seconds * 6))
    formants = [(_smooth_track(rng, n_formant_frames(n), lo, hi, knots), bw)
                for lo, hi, bw in ((300, 850, 90), (850, 2400, 120), (2300, 3300, 180))]
    # glottal source: a sawtooth at f0 (harmonics falling as 1/h), then the vocal tract
    cycles = np.cumsum(f0) / sr + rng.uniform()
    voiced = _formant_filter(2 * (cycles % 1.0) - 1, formants, sr)
    # fricatives: white noise high-passed at 2.5-4 kHz (an FFT mask, no filter state)
    spec = np.fft.rfft(rng.standard_normal(n))
    spec[np.fft.rfftfreq(n, 1 / sr) < rng.uniform(2500, 4000)] = 0
    fric = np.fft.irfft(spec, n)
    fric *= np.std(voiced) / (np.std(fric) + 1e-12)
    # a syllable plan: voiced, fricative or silent segments of random length
    env_v, env_f = np.zeros(n), np.zeros(n)
    pos = int(rng.uniform(0.05, 0.15) * sr)  # every clip opens with a silence
    while pos < n:
        kind = rng.choice(3, p=(0.55, 0.2, 0.25))
        length = min(int(rng.uniform(*((0.08, 0.3), (0.04, 0.12), (0.05, 0.2))[kind]) * sr),
                     n - pos)
        if kind < 2 and length > 1:
            (env_v if kind == 0 else env_f)[pos:pos + length] = _ramp(length, sr) * (
                rng.uniform(0.5, 1.0) if kind == 0 else rng.uniform(0.15, 0.4))
        pos += length
    x = voiced * env_v + fric * env_f
    rms = np.sqrt(np.mean(x**2)) + 1e-12
    return x / rms + 10 ** (-35 / 20) * rng.standard_normal(n)  # unit RMS + noise floor


def _burst(rng: np.random.Generator, band: np.ndarray, n: int, sr: int):
    """A chirped three-partial tone complex inside ``band``: ``(wave [n], span, freqs)``."""
    length = int(rng.uniform(*BURST_SECONDS) * sr)
    start = int(rng.uniform(0.05 * sr, n - length - 0.05 * sr))
    lo, hi = band
    width = hi - lo
    inner = (lo + GUARD * width, hi - GUARD * width)
    f_start = rng.uniform(*inner, PARTIALS)
    f_end = np.clip(f_start + rng.uniform(-0.15, 0.15, PARTIALS) * width, *inner)
    glide = np.linspace(0, 1, length)[:, None]
    f = f_start * (1 - glide) + f_end * glide  # [length, partials]
    phase = 2 * np.pi * np.cumsum(f, axis=0) / sr + rng.uniform(0, 2 * np.pi, PARTIALS)
    tone = np.sin(phase).sum(axis=1) * _ramp(length, sr, 0.02)
    tone /= np.sqrt(np.mean(tone**2)) + 1e-12
    wave = np.zeros(n)
    wave[start:start + length] = tone
    return wave, (start, start + length), (f.min(), f.max())


def generate(n: int, seed: int, *, n_classes: int = 4, seconds: float = 2.0,
             sample_rate: int = 16000, n_distractors: int = 2,
             evidence_db: tuple[float, float] = (-8.0, -2.0),
             f_range: tuple[float, float] = (400.0, 7000.0), parts: bool = False) -> Planted:
    """``n`` planted clips of ``seconds`` at ``sample_rate``, reproducible from ``seed``.

    Class ``k``'s evidence is a burst in band ``2k`` of :func:`bands` (``f_range`` cut
    into ``2 * n_classes`` mel-equal bands); ``n_distractors`` bursts go to random odd
    (distractor) bands. Each burst's RMS over its span is ``evidence_db`` (uniform in
    the range) relative to the speech's RMS. ``parts``: also return the evidence and
    distractor signals alone (:class:`Planted`); the clips are the same either way.
    """
    if n < 1 or n_classes < 2:
        raise ValueError(f"need n >= 1 and n_classes >= 2, got n={n}, n_classes={n_classes}")
    if f_range[1] >= sample_rate / 2:
        raise ValueError(f"f_range {f_range} reaches Nyquist ({sample_rate / 2} Hz)")
    table = bands(n_classes, *f_range)
    root = np.random.SeedSequence(seed)
    label_seed, *clip_seeds = root.spawn(n + 1)
    labels = np.random.default_rng(label_seed).permutation(np.arange(n) % n_classes)
    n_samples = int(round(seconds * sample_rate))
    waves = np.zeros((n, n_samples), np.float32)
    spans = np.zeros((n, 2), np.int64)
    freqs = np.zeros((n, 2))
    d_spans = np.zeros((n, n_distractors, 2), np.int64)
    d_freqs = np.zeros((n, n_distractors, 2))
    evidence = np.zeros((n, n_samples), np.float32) if parts else None
    distractors = np.zeros((n, n_samples), np.float32) if parts else None
    for i in range(n):
        rng = np.random.default_rng(clip_seeds[i])
        speech = _speech(rng, n_samples, sample_rate)
        burst, spans[i], freqs[i] = _burst(rng, table[2 * labels[i]], n_samples, sample_rate)
        ev = 10 ** (rng.uniform(*evidence_db) / 20) * burst
        dis = np.zeros(n_samples)
        for j in range(n_distractors):
            band = table[2 * rng.integers(n_classes) + 1]
            burst, d_spans[i, j], d_freqs[i, j] = _burst(rng, band, n_samples, sample_rate)
            dis += 10 ** (rng.uniform(*evidence_db) / 20) * burst
        x = speech + ev + dis
        # a random overall level, peak at most 0.9 (no clipping)
        gain = 10 ** (rng.uniform(-12, 0) / 20) * 0.9 / np.abs(x).max()
        waves[i] = gain * x
        if parts:
            evidence[i], distractors[i] = gain * ev, gain * dis
    return Planted(waves, labels.astype(np.int32), spans, freqs, d_spans, d_freqs,
                   table[0::2], sample_rate, seed, evidence, distractors)
