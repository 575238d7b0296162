"""Whisper's log-mel front end in jnp (openai/whisper ``log_mel_spectrogram``, HF
``WhisperFeatureExtractor``).

wave [B, samples] at 16 kHz -> zero-pad / trim to 30 s (480000 samples) ->
|STFT|^2 (n_fft 400, hop 160, periodic Hann, centred, reflect padding), last
frame dropped -> slaney mel filters -> log10(max(x, 1e-10)) ->
max(x, max_per_item - 8) -> (x + 4) / 4 -> features [B, n_mels, 3000].

The max-8 dynamic-range clamp is taken per item, as the HF extractor does for a
batch (openai/whisper takes it over the whole tensor, so batching would couple
items there). Audio longer than 30 s is trimmed to its first 30 s, as both
references do; :func:`jaxspeech.models.whisper` warns when that happens.
A shorter window (HF's ``chunk_length``) is ``n_samples``: frames = n_samples // 160.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxspeech.frontends.spectral import mel_filter_bank, power_spectrogram

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = SAMPLE_RATE * CHUNK_SECONDS  # 480000
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000


def pad_or_trim(wave: jnp.ndarray, n_samples: int = N_SAMPLES) -> jnp.ndarray:
    """Zero-pad or cut ``[..., samples]`` to exactly ``n_samples``."""
    n = wave.shape[-1]
    if n >= n_samples:
        return wave[..., :n_samples]
    return jnp.pad(wave, [(0, 0)] * (wave.ndim - 1) + [(0, n_samples - n)])


def mel_filters(n_mels: int) -> jnp.ndarray:
    """Whisper's mel matrix ``[201, n_mels]`` (librosa slaney, 0-8 kHz)."""
    fb = mel_filter_bank(N_FFT // 2 + 1, n_mels, 0.0, SAMPLE_RATE / 2, SAMPLE_RATE,
                         norm="slaney", mel_scale="slaney")
    return jnp.asarray(fb, jnp.float32)


def log_mel_spectrogram(wave: jnp.ndarray, n_mels: int = 80, n_samples: int = N_SAMPLES) -> jnp.ndarray:
    """``wave [B, samples]`` (16 kHz, any length) -> ``features [B, n_mels, n_samples // 160]``
    (3000 frames for the default 30 s window)."""
    wave = pad_or_trim(wave, n_samples)
    power = power_spectrogram(wave, n_fft=N_FFT, hop_length=HOP_LENGTH)[:, :-1, :]
    mel = jnp.einsum("btf,fm->bmt", power, mel_filters(n_mels).astype(power.dtype),
                     precision="highest")
    log_spec = jnp.log10(jnp.maximum(mel, 1e-10))
    peak = jnp.max(log_spec, axis=(1, 2), keepdims=True)
    log_spec = jnp.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0
