"""SpeechBrain's ``Fbank`` front end and sentence mean normalisation, in jnp.

    wave [B, samples] at 16 kHz
      -> |STFT|^2: n_fft 400, hop 160, periodic Hamming(400), centred with ZERO padding
      -> SpeechBrain's triangular mel filterbank (HTK mel, f_min 0 .. f_max sr/2,
         symmetric triangles of the filter's left band width, peak 1, no area norm)
      -> 10 * log10(max(x, 1e-10)), then max(x, max_item - 80)      (top_db, per item)
      -> minus the item's mean over its valid frames                 (InputNormalization)
      -> features [B, frames, n_mels], frames = 1 + samples // 160

Read from the installed ``speechbrain`` 1.1.2 (``lobes/features.py`` ``Fbank``,
``processing/features.py`` ``STFT``, ``Filterbank``, ``InputNormalization``):

- ``Filterbank._amplitude_to_DB`` takes the top_db maximum per utterance
  (``amax(dim=(-2, -1))``), over *all* frames of the tensor, padding included.
  Here the maximum is taken over the item's valid frames only, so that a padded
  item gives exactly the features it gives alone. The two differ only when the
  frame just past an item's end (which still overlaps its last samples) is the
  loudest of the item and the 80 dB floor is active somewhere.
- ``InputNormalization(norm_type="sentence")`` masks with ``make_padding_mask``:
  frame ``t`` is valid when ``t < lengths * T - 1e-6`` (float32), i.e. the count is
  ``ceil(lengths * T)`` for a non-integer product -- neither round nor floor. The
  mean is the plain average of the valid frames; with ``std_norm=False``
  (spkrec-ecapa-voxceleb) the std is 1. The padding frames are normalised too
  (``avoid_padding_norm=False``).
- Relative lengths in SpeechBrain are relative *sample* lengths (``wav_lens``) also
  when they mask *frames*; with ``ceil`` this can count one frame more than the
  clip has alone (e.g. 16100 of 32000 samples: ceil(0.503 * 201) = 102 frames, the
  clip alone has 101). :func:`frame_lengths` converts sample lengths to frame
  lengths that select exactly the clip's own frames under that ``ceil`` rule
  (``(n - 0.5) / T``, half a frame clear of any rounding).

The filterbank is built in float32 NumPy step by step as SpeechBrain builds it in
torch. What remains is float32 FFT rounding: bins 80 dB below an item's peak differ
by ~1e-3 dB from torch's (relative ~3e-5 of the features' scale). Everything is
differentiable in ``wave``.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from jaxspeech.frontends.spectral import hz_to_mel, power_spectrogram

__all__ = ["filterbank", "fbank", "sentence_norm", "frame_lengths", "valid_mask", "n_frames"]

SAMPLE_RATE = 16000
N_FFT = 400
WIN_LENGTH = 400  # 25 ms at 16 kHz
HOP_LENGTH = 160  # 10 ms at 16 kHz
AMIN = 1e-10
TOP_DB = 80.0
MASK_EPS = 1e-6  # make_padding_mask's eps


def _torch_linspace32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace`` in float32: the first half counts up from ``start``, the
    second half down from ``end``."""
    step = np.float32((end - start) / (steps - 1))
    i = np.arange(steps)
    up = np.float32(start) + step * i.astype(np.float32)
    down = np.float32(end) - step * (steps - 1 - i).astype(np.float32)
    return np.where(i < steps // 2, up, down).astype(np.float32)


@functools.lru_cache(maxsize=16)
def filterbank(n_mels: int = 80, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
               f_min: float = 0.0, f_max: float | None = None) -> np.ndarray:
    """SpeechBrain's triangular filterbank ``[n_fft // 2 + 1, n_mels]`` (float32).

    ``n_mels + 2`` points equally spaced on the HTK mel scale give the centres
    ``hz[1:-1]`` and each filter's *left* band ``hz[i+1] - hz[i]``, used on both
    sides: ``max(0, 1 - |f - centre| / band)``. Computed step by step in float32 as
    ``Filterbank.__init__`` / ``_triangular_filters`` do (only ``10 ** x`` is rounded
    from float64, within one ulp of torch's).
    """
    f32 = np.float32
    f_max = sample_rate // 2 if f_max is None else f_max
    mel = _torch_linspace32(float(hz_to_mel(f_min, "htk")), float(hz_to_mel(f_max, "htk")),
                            n_mels + 2)
    hz = f32(700) * ((10.0 ** (mel / f32(2595)).astype(np.float64)).astype(f32) - f32(1))
    band = (hz[1:] - hz[:-1])[:-1]
    centre = hz[1:-1]
    freqs = _torch_linspace32(0.0, float(sample_rate // 2), n_fft // 2 + 1)
    slope = (freqs[:, None] - centre[None, :]) / band[None, :]
    return np.maximum(f32(0), np.minimum(slope + f32(1), f32(1) - slope)).astype(f32)


def n_frames(n_samples: int, hop_length: int = HOP_LENGTH) -> int:
    """Frames of a centred STFT of ``n_samples``: ``1 + n_samples // hop``."""
    return 1 + n_samples // hop_length


def valid_mask(lengths: jnp.ndarray | None, n_time: int, batch: int,
               eps: float = 0.0) -> jnp.ndarray:
    """``[B, n_time]`` bool: ``t < lengths * n_time - eps`` in float32, SpeechBrain's
    ``length_to_mask`` (``eps=0``) and ``make_padding_mask`` (``eps=1e-6``)."""
    if lengths is None:
        return jnp.ones((batch, n_time), bool)
    limit = jnp.asarray(lengths, jnp.float32) * jnp.float32(n_time)
    if eps:
        limit = limit - jnp.float32(eps)
    return jnp.arange(n_time, dtype=jnp.float32)[None, :] < limit[:, None]


def frame_lengths(lengths: jnp.ndarray | None, n_samples: int, batch: int,
                  hop_length: int = HOP_LENGTH) -> jnp.ndarray:
    """Relative sample lengths ``[B]`` -> relative frame lengths ``[B]``.

    An item of ``round(lengths * n_samples)`` samples has ``n = 1 + samples // hop``
    frames of its own. The result is ``(n - 0.5) / total`` (``1`` for a full item):
    half a frame below the count, so every ``ceil``-style mask above (ours and
    SpeechBrain's) selects exactly those ``n`` frames whatever the float rounding
    (XLA may turn ``/ total`` into ``* (1 / total)``; a value of exactly
    ``n / total`` can land one ulp above ``n`` and take one frame more). ``None`` -> ones.
    """
    total = n_frames(n_samples, hop_length)
    if lengths is None:
        return jnp.ones((batch,), jnp.float32)
    samples = jnp.round(jnp.asarray(lengths, jnp.float32) * n_samples).astype(jnp.int32)
    frames = jnp.minimum(1 + samples // hop_length, total)
    rel = (frames.astype(jnp.float32) - 0.5) / jnp.float32(total)
    return jnp.where(frames == total, jnp.float32(1.0), rel)


def fbank(wave: jnp.ndarray, lengths: jnp.ndarray | None = None, *, n_mels: int = 80,
          sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, win_length: int = WIN_LENGTH,
          hop_length: int = HOP_LENGTH, f_min: float = 0.0, f_max: float | None = None,
          top_db: float = TOP_DB) -> jnp.ndarray:
    """``wave [B, samples]`` -> log filterbank energies ``[B, 1 + samples // hop, n_mels]`` (dB).

    ``lengths``: relative *frame* lengths (see :func:`frame_lengths`); the top_db
    maximum is taken over each item's valid frames. ``None``: all frames.
    """
    wave = wave.astype(jnp.float32)
    power = power_spectrogram(wave, n_fft=n_fft, hop_length=hop_length, win_length=win_length,
                              window_name="hamming", center=True, pad_mode="constant")
    fb = jnp.asarray(filterbank(n_mels, n_fft, sample_rate, f_min, f_max), jnp.float32)
    mel = jnp.einsum("btf,fm->btm", power, fb, precision="highest")
    db = 10.0 * jnp.log10(jnp.maximum(mel, AMIN))  # ref_value 1: no offset
    mask = valid_mask(lengths, db.shape[1], db.shape[0], MASK_EPS)
    peak = jnp.max(jnp.where(mask[:, :, None], db, -jnp.inf), axis=(1, 2), keepdims=True)
    return jnp.maximum(db, peak - top_db)


def sentence_norm(features: jnp.ndarray, lengths: jnp.ndarray | None = None, *,
                  std_norm: bool = False, epsilon: float = 1e-10) -> jnp.ndarray:
    """``InputNormalization(norm_type="sentence")`` of ``features [B, T, F]``.

    Each item minus its mean over its valid frames (``lengths``: relative frame
    lengths, SpeechBrain's mask); with ``std_norm`` also divided by
    ``max(std, epsilon)``, the biased std over the valid frames.
    """
    mask = valid_mask(lengths, features.shape[1], features.shape[0], MASK_EPS)
    m = mask.astype(features.dtype)
    count = jnp.sum(m, axis=1)[:, None, None]

    def masked_sum(v):  # a matrix product: XLA:CPU reduces a middle axis slowly
        return jnp.einsum("bt,btf->bf", m, v, precision="highest")[:, None, :]

    centred = features - masked_sum(features) / count
    if not std_norm:
        return centred
    std = jnp.sqrt(masked_sum(jnp.square(centred)) / count)
    return centred / jnp.maximum(std, epsilon)
