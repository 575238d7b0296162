"""Waveforms in: read, resample and validate audio before it reaches a front end.

Every model takes mono float waveforms at its own sample rate, batched as
``[B, samples]``. :func:`as_batch` is the single gate all entry points use; it
turns what users really pass (a 1-D clip, a list of clips of unequal length,
integer PCM) into that layout or fails with a message that says what to do.

Documented conversions (no error):
- a 1-D array is a batch of one;
- a list of 1-D clips of unequal length is zero-padded to the longest, and the
  relative lengths are returned so that masked models ignore the padding;
- integer PCM is scaled to [-1, 1): int16 / 32768, int32 / 2**31, uint8 as
  (x - 128) / 128 (the WAV conventions).

Errors (``AudioError``, a ``ValueError``): a sample rate other than the model's,
multi-channel audio, an empty clip, NaN or inf samples, more than 3 dimensions.

Files are another matter: :func:`read` is the explicit conversion (what the command
line uses), so it resamples and averages channels, and says so on the
``jaxspeech.audio`` logger: a warning the first time a file needs a given conversion,
then one INFO line per file (a corpus of 44.1 kHz files is not one warning per file).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import jax
import numpy as np

__all__ = ["AudioError", "as_batch", "read", "resample", "pcm_to_float"]

log = logging.getLogger("jaxspeech.audio")


class AudioError(ValueError):
    """Raised for audio a model cannot take; the message says how to fix it."""


_PCM_SCALE = {np.dtype(np.int16): 32768.0, np.dtype(np.int32): 2.0**31, np.dtype(np.int8): 128.0}


def pcm_to_float(x: np.ndarray) -> np.ndarray:
    """Integer PCM -> float32 in [-1, 1) by the WAV conventions; floats pass through."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return (x.astype(np.float32) - 128.0) / 128.0
    if x.dtype in _PCM_SCALE:
        return (x.astype(np.float32) / _PCM_SCALE[x.dtype]).astype(np.float32)
    if np.issubdtype(x.dtype, np.integer):
        raise AudioError(f"integer audio of dtype {x.dtype} has no PCM convention; "
                         "pass float samples in [-1, 1] or int16/int32/uint8 PCM")
    if np.issubdtype(x.dtype, np.complexfloating) or x.dtype == np.bool_:
        raise AudioError(f"audio must be real-valued samples, got dtype {x.dtype}")
    return x.astype(np.float32)


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _looks_multichannel(shape: tuple[int, ...]) -> bool:
    # soundfile/librosa give channels-last [samples, channels]; a 2-D batch
    # is [items, samples] with many more samples than items.
    return len(shape) == 2 and shape[1] <= 8 and shape[0] > 8 * shape[1]


def as_batch(
    wave,
    *,
    expected_rate: int,
    sample_rate: int | None = None,
    max_samples: int | None = None,
    name: str = "model",
):
    """Validate audio and return ``(batch [B, samples] float32, lengths [B] or None)``.

    ``lengths`` are relative lengths in (0, 1] (SpeechBrain's convention), given
    only when a list of unequal clips was padded. Traced inputs (under ``jax.grad``
    or ``jit``) are checked for shape only; their values cannot be inspected.

    ``max_samples``: clips longer than this raise, naming the limit. Models that
    trim instead (Whisper's 30 s window) pass ``None`` and trim in their front end.
    """
    if sample_rate is not None and int(sample_rate) != int(expected_rate):
        raise AudioError(
            f"{name} expects {expected_rate} Hz audio, got {sample_rate} Hz; resample first "
            f"(jaxspeech.audio.resample(wave, {sample_rate}, {expected_rate}) or "
            f"jaxspeech.audio.read(path, {expected_rate}))")
    lengths = None
    if isinstance(wave, (list, tuple)):
        if not wave:
            raise AudioError("empty list of clips")
        clips = [pcm_to_float(np.asarray(w)) for w in wave]
        for i, c in enumerate(clips):
            if c.ndim != 1:
                raise AudioError(f"clip {i} has shape {c.shape}; each clip in a list must be "
                                 "1-D mono samples (average the channels of stereo audio)")
        n = max(c.shape[0] for c in clips)
        if n == 0:
            raise AudioError("all clips are empty (0 samples)")
        batch = np.zeros((len(clips), n), np.float32)
        for i, c in enumerate(clips):
            batch[i, : c.shape[0]] = c
        sizes = np.array([c.shape[0] for c in clips])
        if (sizes != n).any():
            lengths = (sizes / n).astype(np.float32)
        wave = batch
    elif not _is_traced(wave):
        wave = pcm_to_float(np.asarray(wave)) if not isinstance(wave, jax.Array) else wave
        if not np.issubdtype(wave.dtype, np.floating):
            wave = pcm_to_float(np.asarray(wave))

    shape = tuple(wave.shape)
    if len(shape) == 1:
        wave = wave[None]
    elif len(shape) == 3:
        raise AudioError(
            f"audio of shape {shape} looks multi-channel ([batch, channels, samples]); "
            f"{name} takes mono: average the channels first (wave.mean(axis=1))")
    elif len(shape) != 2:
        raise AudioError(f"audio must be [samples] or [batch, samples], got shape {shape}")
    elif _looks_multichannel(shape):
        raise AudioError(
            f"audio of shape {shape} looks like channels-last stereo ([samples, channels]); "
            f"{name} takes mono: average the channels first (wave.mean(axis=-1))")
    if wave.shape[-1] == 0 or wave.shape[0] == 0:
        raise AudioError(f"empty audio (shape {tuple(wave.shape)}): nothing to process")
    if max_samples is not None and wave.shape[-1] > max_samples:
        raise AudioError(
            f"audio of {wave.shape[-1]} samples is longer than {name}'s limit of "
            f"{max_samples} samples ({max_samples / expected_rate:.1f} s); split it into windows")
    if not _is_traced(wave):
        finite = np.isfinite(np.asarray(wave)).all(axis=-1)
        if not finite.all():
            bad = np.flatnonzero(~finite).tolist()
            raise AudioError(f"audio contains NaN or inf samples (batch items {bad})")
        wave = jax.numpy.asarray(wave, dtype=jax.numpy.float32)
    return wave, lengths


def resample(wave: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Resample along the last axis with soxr (high quality); float32 out."""
    wave = pcm_to_float(np.asarray(wave))
    if int(orig_rate) == int(target_rate):
        return wave
    import soxr

    if wave.ndim == 1:
        return soxr.resample(wave, orig_rate, target_rate).astype(np.float32)
    return np.stack([soxr.resample(w, orig_rate, target_rate) for w in wave]).astype(np.float32)


def read(path: str | os.PathLike, sample_rate: int, *, mono: bool = True) -> np.ndarray:
    """Read an audio file (wav/flac/ogg via soundfile, others via librosa) as
    float32 ``[samples]`` (``[channels, samples]`` when not ``mono``) at ``sample_rate``;
    channels are averaged when ``mono``. Either conversion is logged (``jaxspeech.audio``)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such audio file: {path}")
    try:
        import soundfile as sf

        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as sf_error:  # soundfile lacks mp3/m4a on some builds: try librosa
        try:
            import warnings

            import librosa

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data, rate = librosa.load(path, sr=None, mono=False)
        except Exception:
            raise AudioError(f"cannot read {path}: {sf_error}") from sf_error
        data = np.atleast_2d(data).T
    if data.shape[0] == 0:
        raise AudioError(f"{path} holds no samples")
    _report_conversion(path, rate, data.shape[1], sample_rate, mono)
    if mono:
        data = data.mean(axis=1)
    elif data.shape[1] == 1:
        data = data[:, 0]
    return resample(data.T if data.ndim == 2 else data, rate, sample_rate)


_REPORTED: set[tuple[int, int, int]] = set()  # conversions already warned about


def _report_conversion(path: str, rate: int, channels: int, sample_rate: int, mono: bool) -> None:
    """Log what :func:`read` changes (rate, channels): a warning the first time a
    conversion is met in this process, INFO for each file after it."""
    done = []
    if mono and channels > 1:
        done.append(f"{channels} channels averaged to mono")
    if int(rate) != int(sample_rate):
        done.append(f"resampled {rate} -> {sample_rate} Hz (soxr)")
    if not done:
        return
    kind = (int(rate), channels if mono else 1, int(sample_rate))
    if kind in _REPORTED:
        log.info("%s: %s", path, ", ".join(done))
        return
    _REPORTED.add(kind)
    log.warning("%s: %s (further files converted the same way are logged at INFO level)",
                path, ", ".join(done))


def stack_clips(clips: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad 1-D clips to one ``[B, samples]`` array; also return relative lengths."""
    batch, lengths = as_batch(list(clips), expected_rate=1)
    n = batch.shape[0]
    return np.asarray(batch), (np.ones(n, np.float32) if lengths is None else lengths)
