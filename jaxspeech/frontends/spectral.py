"""Shared spectral pieces of the front ends: windows, framing, power spectra, mel filters.

All in jnp and differentiable with respect to the waveform. Filter banks and
windows are built once in float64 NumPy (as the references do) and cast.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

__all__ = ["window", "power_spectrogram", "mel_filter_bank", "hz_to_mel", "mel_to_hz"]


@functools.lru_cache(maxsize=32)
def window(name: str, length: int, periodic: bool = True) -> np.ndarray:
    """``hann`` / ``hamming`` window of ``length`` samples (periodic by default, as
    ``torch.hann_window`` and HF ``window_function``), float64."""
    n = length + 1 if periodic else length
    k = np.arange(n)
    if name == "hann":
        w = 0.5 - 0.5 * np.cos(2 * np.pi * k / (n - 1))
    elif name == "hamming":
        w = 0.54 - 0.46 * np.cos(2 * np.pi * k / (n - 1))
    else:
        raise ValueError(f"unknown window {name!r}; expected 'hann' or 'hamming'")
    return w[:length] if periodic else w


def frame(wave: jnp.ndarray, frame_length: int, hop_length: int) -> jnp.ndarray:
    """``[..., samples]`` -> ``[..., frames, frame_length]`` (no padding; frames that fit)."""
    n_frames = 1 + (wave.shape[-1] - frame_length) // hop_length
    idx = np.arange(n_frames)[:, None] * hop_length + np.arange(frame_length)[None, :]
    return wave[..., idx]


def power_spectrogram(
    wave: jnp.ndarray,
    *,
    n_fft: int,
    hop_length: int,
    win_length: int | None = None,
    window_name: str = "hann",
    center: bool = True,
    pad_mode: str = "reflect",
) -> jnp.ndarray:
    """|STFT|^2 of ``wave [B, samples]`` -> ``[B, frames, n_fft // 2 + 1]``.

    Matches ``torch.stft(center=center, pad_mode=pad_mode, onesided=True)`` with a
    periodic window of ``win_length`` zero-padded (centred) to ``n_fft``.
    """
    win_length = win_length or n_fft
    w = window(window_name, win_length)
    if win_length < n_fft:
        left = (n_fft - win_length) // 2
        w = np.pad(w, (left, n_fft - win_length - left))
    if center:
        pad = [(0, 0)] * (wave.ndim - 1) + [(n_fft // 2, n_fft // 2)]
        wave = jnp.pad(wave, pad, mode=pad_mode)
    frames = frame(wave, n_fft, hop_length)
    frames = frames * jnp.asarray(w, wave.dtype).reshape((1,) * (frames.ndim - 1) + (-1,))
    spec = jnp.fft.rfft(frames, n=n_fft, axis=-1)
    return jnp.real(spec) ** 2 + jnp.imag(spec) ** 2


def hz_to_mel(freq, mel_scale: str = "slaney"):
    """Hertz -> mel on the ``slaney`` (librosa default), ``htk`` or ``kaldi`` scale."""
    freq = np.asarray(freq, np.float64)
    if mel_scale == "htk":
        return 2595.0 * np.log10(1.0 + freq / 700.0)
    if mel_scale == "kaldi":
        return 1127.0 * np.log(1.0 + freq / 700.0)
    if mel_scale != "slaney":
        raise ValueError(f"unknown mel scale {mel_scale!r}")
    logstep = 27.0 / np.log(6.4)
    mels = 3.0 * freq / 200.0
    return np.where(freq >= 1000.0, 15.0 + np.log(np.maximum(freq, 1e-10) / 1000.0) * logstep,
                    mels)


def mel_to_hz(mels, mel_scale: str = "slaney"):
    """Inverse of :func:`hz_to_mel`."""
    mels = np.asarray(mels, np.float64)
    if mel_scale == "htk":
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    if mel_scale == "kaldi":
        return 700.0 * (np.exp(mels / 1127.0) - 1.0)
    if mel_scale != "slaney":
        raise ValueError(f"unknown mel scale {mel_scale!r}")
    logstep = np.log(6.4) / 27.0
    return np.where(mels >= 15.0, 1000.0 * np.exp(logstep * (mels - 15.0)), 200.0 * mels / 3.0)


@functools.lru_cache(maxsize=32)
def mel_filter_bank(
    n_freqs: int,
    n_mels: int,
    f_min: float,
    f_max: float,
    sample_rate: int,
    norm: str | None = "slaney",
    mel_scale: str = "slaney",
) -> np.ndarray:
    """Triangular mel filters ``[n_freqs, n_mels]`` (float64), as librosa's
    ``filters.mel`` and HF's ``audio_utils.mel_filter_bank`` build them."""
    mel_pts = np.linspace(hz_to_mel(f_min, mel_scale), hz_to_mel(f_max, mel_scale), n_mels + 2)
    filter_freqs = mel_to_hz(mel_pts, mel_scale)
    fft_freqs = np.linspace(0, sample_rate // 2, n_freqs)
    diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    if norm == "slaney":
        filters = filters * (2.0 / (filter_freqs[2:] - filter_freqs[:-2]))[None, :]
    elif norm is not None:
        raise ValueError(f"unknown mel norm {norm!r}; expected 'slaney' or None")
    return filters
