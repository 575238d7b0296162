"""Speech-like synthetic signals for tests, `jaxspeech compare` and benchmarks (no downloads)."""

import numpy as np


def harmonic_sweep(seconds: float, sr: int, f0=(110.0, 220.0), n_harmonics=12, seed=0):
    """A voiced sound: a gliding fundamental with decaying harmonics and slow AM."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f = np.linspace(f0[0], f0[1], t.size)
    phase = 2 * np.pi * np.cumsum(f) / sr
    x = sum(np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k for k in range(1, n_harmonics + 1))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t) ** 2
    return (0.1 * x * envelope).astype(np.float32)


def noise_bursts(seconds: float, sr: int, seed=1):
    """Fricative-like bursts of white noise separated by near-silence."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    x = 1e-4 * rng.standard_normal(n)
    for start in rng.integers(0, max(n - sr // 10, 1), size=max(int(seconds * 3), 1)):
        x[start:start + sr // 10] += 0.2 * rng.standard_normal(min(sr // 10, n - start))
    return x.astype(np.float32)


def clipped(seconds: float, sr: int):
    return np.clip(harmonic_sweep(seconds, sr, seed=2) * 20, -1.0, 1.0).astype(np.float32)


def silence(seconds: float, sr: int):
    return np.zeros(int(seconds * sr), np.float32)


def speech_like_batch(seconds: float, sr: int):
    """``[4, samples]``: sweep, noise bursts, silence, clipped."""
    return np.stack([harmonic_sweep(seconds, sr), noise_bursts(seconds, sr),
                     silence(seconds, sr), clipped(seconds, sr)])
